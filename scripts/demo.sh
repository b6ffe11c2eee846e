#!/usr/bin/env bash
# The main job: quantize real all-MiniLM-L6-v2 to NF4, finetune LoRA briefly, print a comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/lqmod demo "$@"
