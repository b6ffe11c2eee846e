#!/usr/bin/env bash
# The test suite. Extra arguments go to pytest (e.g. -m "not slow", -k nf).
#
# Without a -m of your own, tests marked `gptqmodel` run in a second pass with GPTQModel
# (installed by scripts/setup-gptqmodel.sh into its own folder) on PYTHONPATH: importing it
# in the main pass would change PEFT's behaviour for every other test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GPTQMODEL_CPU_WORKERS=2

run() {
  set +e
  "$@"
  local rc=$?
  set -e
  # pytest's 5 means "no tests collected": a selection that matched nothing is a failure here.
  [ "$rc" -eq 5 ] && echo "pytest collected no tests" >&2
  return "$rc"
}

user_marker=0
for a in "$@"; do [[ "$a" == -m* ]] && user_marker=1; done
site=""
if [ "$user_marker" -eq 0 ]; then
  site=$(bash scripts/setup-gptqmodel.sh) || site=""
fi

if [ -z "$site" ]; then
  run .venv/bin/python -m pytest "$@" && exit 0 || exit $?
fi
rc1=0; rc2=0
run .venv/bin/python -m pytest -m "not gptqmodel" "$@" || rc1=$?
echo "--- second pass: tests against GPTQModel ($site) ---"
PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" .venv/bin/python -m pytest -m gptqmodel "$@" || rc2=$?
# 5: the caller's selection holds no GPTQModel test, which is fine for this pass.
[ "$rc2" -eq 5 ] && rc2=0
[ "$rc1" -ne 0 ] && exit "$rc1"
exit "$rc2"
