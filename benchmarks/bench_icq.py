"""ICQ (IR-QLoRA's per-block entropy-maximising shift) vs the plain base: a thin wrapper over ``lqmod bench icq``.

The work lives in :mod:`lqmod.bench.icq`; this script keeps the committed commands and their
defaults (MiniLM: 256 calibration sentences, tau_n 12; SmolLM2: 8 calibration windows of 256
tokens, tau_n 4, perplexity on the first 2048 tokens of WikiText-2 raw test at context 256):

    OMP_NUM_THREADS=1 python benchmarks/bench_icq.py --model minilm     # -> results/icq.{json,md,png}
    OMP_NUM_THREADS=1 python benchmarks/bench_icq.py --model smollm2 --cache /work/cache_icq
                                                                          # -> results/icq_smollm2.{json,md,png}
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    from lqmod.bench.command import main as bench_main

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--rows", default=None, help="comma-separated label substrings: run only matching rows")
    p.add_argument("--n-calib", type=int, default=None, help="default: 256 sentences (MiniLM), 8 windows (SmolLM2)")
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lqmod" / "bench_init"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    n_calib = args.n_calib or (8 if args.model == "smollm2" else 256)
    forward = ["bench", "icq", "--model", args.model, "--n-calib", str(n_calib), "--ppl-tokens", str(args.ppl_tokens),
               "--cache", args.cache, "--out", str(args.out)]  # fmt: skip
    forward += ["--rows", args.rows] if args.rows else []
    forward += ["--report-only"] if args.report_only else []
    return bench_main(forward)


if __name__ == "__main__":
    sys.exit(main())
