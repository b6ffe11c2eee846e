#!/usr/bin/env bash
# One-shot GPU check for lqmod, for a fresh GPU machine with this repository:
#
#   benchmarks/gpu/run.sh                 # set up, GPU tests, kernel benchmark, memory
#   benchmarks/gpu/run.sh --dry-run       # CPU only: argument handling and the JSON it writes
#
# Steps, each under its own time limit so the whole run stays under 8 minutes:
#   1. environment (<= 4 min): a virtualenv with a CUDA torch, picked in this order:
#      a. a python that already imports a CUDA torch (set PYTHON=..., or the system python3
#         of a GPU image): the venv is made with --system-site-packages and reuses it, so
#         nothing large is downloaded (and a machine without internet still works);
#      b. otherwise torch from the PyTorch wheel index matching the driver: the "CUDA Version"
#         nvidia-smi reports picks cu130 / cu128 / cu126 / cu124 / cu121 / cu118 (the newest
#         not above it), at the version constraints/dev.txt pins when that index has it, else
#         the index's newest. The CPU pin itself never applies here.
#      lqmod is installed editable without dependencies, its other packages from the pins.
#   2. the GPU-marked tests (pytest -m gpu tests/kernels), <= 2 min;
#   3. benchmarks/gpu/bench_gpu.py: kernels at batch 1/16/512 (time, fraction of the HBM
#      roofline, ratio to bitsandbytes and to dense bf16) and the peak CUDA memory of one
#      SmolLM2 finetune step (lqmod, bitsandbytes+PEFT, dense weight saved), <= 4 min.
# Everything lands as JSON under benchmarks/results/gpu/ (or --out): run.json says what ran,
# how long each step took and its exit status; tests.json, kernels.json, memory.json.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: benchmarks/gpu/run.sh [--dry-run] [--out DIR] [--venv DIR] [--skip-tests] [--skip-bench]
                             [--bench kernels|memory|all] [--print-torch-index CUDA_VERSION]
  --dry-run        run on CPU with the current python (PYTHON, default python3): no venv, no
                   downloads, toy sizes; checks argument handling and the JSON
  --out DIR        where the JSON goes (default: benchmarks/results/gpu)
  --venv DIR       virtualenv to create or reuse (default: $LQMOD_GPU_VENV or ~/.cache/lqmod-gpu-venv)
  --skip-tests     do not run the GPU-marked tests
  --skip-bench     do not run the kernel and memory benchmarks
  --bench WHAT     which benchmarks: kernels, memory or all (default)
  --print-torch-index V   print the PyTorch wheel index for driver CUDA version V and exit
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DRY=0
OUT="$ROOT/benchmarks/results/gpu"
VENV="${LQMOD_GPU_VENV:-$HOME/.cache/lqmod-gpu-venv}"
SKIP_TESTS=0
SKIP_BENCH=0
BENCH=all
PY="${PYTHON:-python3}"

torch_index_for() {
  # $1: the driver's CUDA version (e.g. 12.4); prints the newest wheel index not above it.
  local v="$1" major minor tag
  if ! [[ "$v" =~ ^([0-9]+)\.([0-9]+)$ ]]; then
    echo "run.sh: CUDA version must look like 12.4, got '$v'" >&2
    return 2
  fi
  major="${BASH_REMATCH[1]}"; minor="${BASH_REMATCH[2]}"
  local n=$((major * 10 + minor))
  if   (( n >= 130 )); then tag=cu130
  elif (( n >= 128 )); then tag=cu128
  elif (( n >= 126 )); then tag=cu126
  elif (( n >= 124 )); then tag=cu124
  elif (( n >= 121 )); then tag=cu121
  elif (( n >= 118 )); then tag=cu118
  else echo "run.sh: CUDA $v is older than 11.8, which no current torch wheel supports" >&2; return 2
  fi
  echo "https://download.pytorch.org/whl/$tag"
}

while (( $# )); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) [[ $# -ge 2 ]] || { echo "run.sh: --out needs a folder" >&2; exit 2; }; OUT="$2"; shift ;;
    --venv) [[ $# -ge 2 ]] || { echo "run.sh: --venv needs a folder" >&2; exit 2; }; VENV="$2"; shift ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-bench) SKIP_BENCH=1 ;;
    --bench)
      [[ $# -ge 2 && "$2" =~ ^(kernels|memory|all)$ ]] || { echo "run.sh: --bench takes kernels, memory or all" >&2; exit 2; }
      BENCH="$2"; shift ;;
    --print-torch-index)
      [[ $# -ge 2 ]] || { echo "run.sh: --print-torch-index needs a CUDA version like 12.4" >&2; exit 2; }
      torch_index_for "$2"; exit $? ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

mkdir -p "$OUT"
START=$SECONDS
STEPS_JSON=""
record() {  # name, exit status, seconds, note
  local note="${4//\"/\'}"
  STEPS_JSON+="${STEPS_JSON:+,}{\"step\": \"$1\", \"exit\": $2, \"seconds\": $3, \"note\": \"$note\"}"
}
run_step() {  # name, time limit (s), command...
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  record "$name" "$rc" $((SECONDS - t0)) "$([[ $rc == 124 ]] && echo "timed out after ${limit}s")"
  return $rc
}

TORCH_CHOICE="current python (dry run)"
if (( DRY )); then
  VPY="$PY"
else
  has_cuda_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
  setup() {
    local base="$PY"
    if has_cuda_torch "$base"; then
      echo "reused: $("$base" -c 'import torch; print(torch.__version__)') from $base" > "$OUT/.torch_choice"
      [[ -x "$VENV/bin/python" ]] || "$base" -m venv --system-site-packages "$VENV" || return 1
    else
      local cuda index pin
      cuda="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\.[0-9]*\).*/\1/p' | head -1)"
      [[ -n "$cuda" ]] || { echo "run.sh: nvidia-smi reports no CUDA version: is there a GPU driver?" >&2; return 1; }
      index="$(torch_index_for "$cuda")" || return 1
      pin="$(sed -n 's/^torch==//p' "$ROOT/constraints/dev.txt" | head -1)"
      [[ -x "$VENV/bin/python" ]] || "$base" -m venv "$VENV" || return 1
      "$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1
      if ! "$VENV/bin/pip" install -q "torch==$pin" --index-url "$index"; then
        echo "run.sh: torch==$pin is not on $index; taking that index's newest" >&2
        "$VENV/bin/pip" install -q torch --index-url "$index" || return 1
      fi
      echo "installed from $index (driver CUDA $cuda)" > "$OUT/.torch_choice"
    fi
    # lqmod itself without dependencies (torch must stay the CUDA one), the rest from the pins.
    grep -v '^torch==' "$ROOT/constraints/dev.txt" > "$VENV/constraints-gpu.txt"
    local pip=("$VENV/bin/pip" install -q --retries 1 --timeout 20)
    "${pip[@]}" --no-deps --no-build-isolation -e "$ROOT" || echo "run.sh: editable install failed; using PYTHONPATH" >&2
    # Only what is missing: a GPU image's own transformers/bitsandbytes stay as they are.
    local missing
    missing="$("$VENV/bin/python" - <<'PYEOF'
import importlib.util
need = {"pluggy": "pluggy", "pydantic": "pydantic", "safetensors": "safetensors", "transformers": "transformers",
        "peft": "peft", "accelerate": "accelerate", "bitsandbytes": "bitsandbytes", "pytest": "pytest",
        "numpy": "numpy", "tqdm": "tqdm", "triton": "triton"}
print(" ".join(dist for mod, dist in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)"
    if [[ -n "$missing" ]]; then
      # shellcheck disable=SC2086
      "${pip[@]}" -c "$VENV/constraints-gpu.txt" $missing || echo "run.sh: could not install: $missing (offline?); continuing" >&2
    fi
    has_cuda_torch "$VENV/bin/python" || { echo "run.sh: the venv's torch does not see a GPU" >&2; return 1; }
  }
  t0=$SECONDS
  echo "== setup (limit 240s)"
  export -f setup has_cuda_torch torch_index_for
  export PY VENV ROOT OUT
  timeout --kill-after=10 240 bash -c setup; rc=$?
  TORCH_CHOICE="$(cat "$OUT/.torch_choice" 2>/dev/null || echo "none (setup failed, exit $rc)")"
  rm -f "$OUT/.torch_choice"
  record setup "$rc" $((SECONDS - t0)) "$TORCH_CHOICE"
  VPY="$VENV/bin/python"
  [[ -x "$VPY" ]] || VPY="$PY"
  if (( rc != 0 )); then
    echo "run.sh: setup failed (exit $rc); running what the current python can" >&2
  fi
fi

export PYTHONPATH="$ROOT/src:$ROOT/plugins:$ROOT/plugins/lqmod-example-rtn/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$ROOT" || exit 1

if (( ! SKIP_TESTS )); then
  run_step tests 120 "$VPY" -m pytest tests/kernels -m gpu -q -p no:cacheprovider --junitxml="$OUT/tests.xml"
  "$VPY" - "$OUT/tests.xml" "$OUT/tests.json" <<'EOF' || true
import json, sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as exc:
    json.dump({"error": f"no junit report: {exc}"}, open(sys.argv[2], "w"))
    raise SystemExit(0)
suite = root if root.tag == "testsuite" else root.find("testsuite")
keys = ("tests", "failures", "errors", "skipped", "time")
summary = {k: float(suite.get(k, 0)) if k == "time" else int(suite.get(k, 0)) for k in keys}
summary["failed"] = [c.get("classname", "") + "::" + c.get("name", "") for c in suite.iter("testcase")
                     if c.find("failure") is not None or c.find("error") is not None]
json.dump(summary, open(sys.argv[2], "w"), indent=1)
EOF
fi

if (( ! SKIP_BENCH )); then
  DRYFLAG=(); (( DRY )) && DRYFLAG=(--dry-run)
  run_step bench 240 "$VPY" benchmarks/gpu/bench_gpu.py "$BENCH" --out "$OUT" "${DRYFLAG[@]}"
fi

COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
cat > "$OUT/run.json" <<EOF
{"schema": 1, "dry_run": $( (( DRY )) && echo true || echo false ), "commit": "$COMMIT",
 "torch_choice": "${TORCH_CHOICE//\"/\'}", "seconds": $((SECONDS - START)),
 "steps": [$STEPS_JSON]}
EOF
echo "wrote $OUT/run.json ($((SECONDS - START)) s)"
