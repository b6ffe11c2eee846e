#!/usr/bin/env bash
# SmolLM2-135M through the causal-LM loop, as a user would run it: NF3 (block 64, double
# quant) + rank-8 LoRA, 40 steps of 8 x 128 packed tokens of WikiText-2 validation, held-out
# perplexity on WikiText-2 raw test before and after. Writes into $1 (default runs/...);
# the committed copy of its outputs is benchmarks/results/finetune_smollm2_nf3/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
R=${1:-runs/finetune_smollm2_nf3}
L=.venv/bin/lqmod
mkdir -p "$R"
/usr/bin/time -v $L quantize smollm2 --quantizer nf --config bits=3,blocksize=64,double_quant=true \
    --out "$R/q" --overwrite 2> "$R/quantize.time"
$L eval --model smollm2 --text wikitext2 --context 256 --max-tokens 4096 --json "$R/eval_fp.json" --no-progress
$L eval --checkpoint "$R/q" --text wikitext2 --context 256 --max-tokens 4096 --json "$R/eval_before.json" --no-progress
/usr/bin/time -v $L finetune "$R/q" --steps 40 --batch-size 8 --seq-len 128 --eval-every 10 --eval-windows 16 \
    --save-every 10 --out "$R/ft" --overwrite --no-progress 2> "$R/finetune.time"
$L eval --checkpoint "$R/ft" --text wikitext2 --context 256 --max-tokens 4096 --json "$R/eval_after.json" --no-progress
