#!/usr/bin/env bash
# Issue 11, part 1: the OPTQ finding confirmed through the library and CLI (fp-model and sequential
# calibration), 4096 eval tokens. Each row is one `lqmod quantize` + `lqmod eval`; finished rows are skipped.
#   bash benchmarks/optq_sink_confirm.sh [ROW ...]       (default: every row below, in order)
# Calibration: 64 windows of 256 tokens of the WikiText-2 *validation* split; evaluation: the first
# 4096 tokens of the WikiText-2 *raw test* split in windows of 256 (each token scored once).
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-benchmarks/results/optq_sink_confirm}
WORK=${WORK:-/tmp/lqmod-optq-confirm}
N_CALIB=${N_CALIB:-64}
mkdir -p "$OUT" "$WORK"
# Fp-model Hessians (one calibration pass per sink weighting, cached): every OPTQ variant below
# is then a quantize + eval. The sequential rows re-calibrate block by block on the quantized
# model (~20-40 min each on the shared 2-core CPU).
CAL=(--calib-text wikitext2 --n-calib "$N_CALIB" --calib-cache "$WORK/stats")
SEQ=(--calib-text wikitext2 --n-calib "$N_CALIB" --sequential)
S=--calib-sink-share
# SmolLM2's in_features are 576 and 1536: group 192 is the largest group dividing both (g128 does not
# fit 576), and its asymmetric grid stores 3.099 bits/param, fewer than NF3 with double quant. With
# byte scales (scale_bits=8) groups of 96 store 3.115 bits/param, also fewer.
declare -A ROWS=(
  [nf3-b64-dq]="--quantizer nf --config bits=3,blocksize=64,double_quant=true"
  [nf3-b64]="--quantizer nf --config bits=3,blocksize=64,double_quant=false"
  [optq3-g64-sym]="--quantizer optq --config bits=3,group_size=64 ${CAL[*]}"
  [optq3-g64-sym-sink0.5]="--quantizer optq --config bits=3,group_size=64 ${CAL[*]} $S 0.5"
  [optq3-g64-asym]="--quantizer optq --config bits=3,group_size=64,sym=false ${CAL[*]}"
  [optq3-g64-asym-sink0.5]="--quantizer optq --config bits=3,group_size=64,sym=false ${CAL[*]} $S 0.5"
  [optq3-g192-asym-sink0.5]="--quantizer optq --config bits=3,group_size=192,sym=false ${CAL[*]} $S 0.5"
  [optq3-g96-s8-asym-sink0.5]="--quantizer optq --config bits=3,group_size=96,sym=false,scale_bits=8 ${CAL[*]} $S 0.5"
  [optq3-g96-s8-asym-sink0.5-actorder-static-damp0.1]="--quantizer optq --config bits=3,group_size=96,sym=false,scale_bits=8,desc_act=true,static_groups=true,damp=0.1 ${CAL[*]} $S 0.5"
  [optq3-g64-asym-sink0.25]="--quantizer optq --config bits=3,group_size=64,sym=false ${CAL[*]} $S 0.25"
  [optq3-g64-asym-sink0.75]="--quantizer optq --config bits=3,group_size=64,sym=false ${CAL[*]} $S 0.75"
  [optq3-g64-asym-sink0.5-damp0.1]="--quantizer optq --config bits=3,group_size=64,sym=false,damp=0.1 ${CAL[*]} $S 0.5"
  [optq3-g64-asym-sink0.5-actorder]="--quantizer optq --config bits=3,group_size=64,sym=false,desc_act=true ${CAL[*]} $S 0.5"
  [optq2-g64-asym-sink0.5]="--quantizer optq --config bits=2,group_size=64,sym=false ${CAL[*]} $S 0.5"
  [nf2-b64-dq]="--quantizer nf --config bits=2,blocksize=64,double_quant=true"
  [seq-optq3-g64-sym]="--quantizer optq --config bits=3,group_size=64 ${SEQ[*]}"
  [seq-optq3-g64-asym-sink0.5]="--quantizer optq --config bits=3,group_size=64,sym=false ${SEQ[*]} $S 0.5"
)
ORDER=(nf3-b64-dq nf3-b64 optq3-g64-sym optq3-g64-sym-sink0.5 optq3-g64-asym optq3-g64-asym-sink0.5
       optq3-g192-asym-sink0.5 optq3-g96-s8-asym-sink0.5 optq3-g64-asym-sink0.25 optq3-g64-asym-sink0.75
       optq3-g64-asym-sink0.5-damp0.1 optq3-g64-asym-sink0.5-actorder optq3-g96-s8-asym-sink0.5-actorder-static-damp0.1
       optq2-g64-asym-sink0.5 nf2-b64-dq
       seq-optq3-g64-asym-sink0.5 seq-optq3-g64-sym)
[ $# -gt 0 ] && ORDER=("$@")
for row in "${ORDER[@]}"; do
  [ -n "${ROWS[$row]:-}" ] || { echo "unknown row $row; rows: ${!ROWS[*]}" >&2; exit 2; }
  [ -s "$OUT/$row.json" ] && { echo "[$row] done"; continue; }
  echo "[$row] $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  lqmod quantize smollm2 ${ROWS[$row]} --out "$WORK/$row" --overwrite > "$WORK/$row.log" 2>&1
  t1=$(date +%s)
  lqmod eval --checkpoint "$WORK/$row" --no-adapters --text wikitext2 --context 256 --max-tokens 4096 \
    --no-progress --json "$WORK/$row.eval.json" >> "$WORK/$row.log" 2>&1
  python - "$row" "$WORK" "$OUT" "$((t1 - t0))" "${ROWS[$row]}" <<'PY'
import json, sys
from pathlib import Path
row, work, out, secs, args = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
ev = json.loads((work / f"{row}.eval.json").read_text())
from lqmod.bench.finetune_lm import storage_bits
from lqmod.io import load_checkpoint
bits, params = storage_bits(load_checkpoint(work / row))
res = {"row": row, "args": args, "ppl": ev.get("ppl"), "bits_per_param": bits, "params": params,
       "eval": ev, "quantize_seconds": secs,
       "load_average": open("/proc/loadavg").read().split()[:3]}
(out / f"{row}.json").write_text(json.dumps(res, indent=1) + "\n")
print(f"[{row}] ppl {ev.get('ppl'):.2f} at {bits:.3f} bits/param ({secs} s to quantize)")
PY
done
