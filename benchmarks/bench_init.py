"""Step-0 LoRA initialization (default / lq-lora / quailora) and ICQ vs plain NF on real models.

A thin wrapper, kept so the committed commands still run: ``--part init`` is ``lqmod bench init``
(:mod:`lqmod.bench.init_bench`) and ``--part icq`` is ``lqmod bench icq`` (:mod:`lqmod.bench.icq`:
plain base vs icq over it, same block and equal bits; mean code entropy, weight and output error,
fidelity). Both read and write the same row cache as before.

Calibration is the WikiText-2 *validation* split (``lqmod.calibration.text``); MiniLM
fidelity uses held-out sentences of the raw test split, SmolLM2 perplexity the first
``--ppl-tokens`` tokens of the raw test split at context ``--ctx``. Never calibrated on test.

    python benchmarks/bench_init.py --model minilm --part init       # = lqmod bench init --model minilm
    python benchmarks/bench_init.py --model smollm2 --part init
    python benchmarks/bench_init.py --model minilm --part icq        # = lqmod bench icq --model minilm
    python benchmarks/bench_init.py --model minilm --part init --report-only   # tables from the cache
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    from lqmod.bench.command import main as bench_main

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    p.add_argument("--part", choices=["init", "icq"], default="init")
    p.add_argument("--rows", help="comma-separated label substrings: run only matching rows")
    p.add_argument("--n-calib", type=int, default=None, help="calibration sentences (MiniLM) or windows (SmolLM2)")
    p.add_argument("--n-eval", type=int, default=256, help="MiniLM: held-out sentences (x2: statistics + fidelity)")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--ppl-tokens", type=int, default=None, help="SmolLM2 perplexity tokens (init 4096, icq 2048)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lqmod" / "bench_init"))
    p.add_argument("--report-only", action="store_true", help="write the report from cached rows, compute nothing")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    ppl = args.ppl_tokens or (4096 if args.part == "init" else 2048)
    argv = ["bench", args.part, "--model", args.model, "--n-eval", str(args.n_eval), "--ctx", str(args.ctx),
            "--ppl-tokens", str(ppl), "--cache", args.cache, "--out", args.out]  # fmt: skip
    argv += ["--n-calib", str(args.n_calib)] if args.n_calib else []
    argv += ["--rows", args.rows] if args.rows else []
    argv += ["--report-only"] if args.report_only else []
    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
