#!/usr/bin/env bash
# The test suite. Extra arguments go to pytest (e.g. -m "not slow", -k nf).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest's 5 means "no tests collected": a selection that matched nothing is a failure here.
[ "$rc" -eq 5 ] && echo "pytest collected no tests" >&2
exit "$rc"
