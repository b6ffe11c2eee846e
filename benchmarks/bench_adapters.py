"""LoRA vs DoRA vs IEC after the same finetuning budget: a thin wrapper over ``lqmod bench adapters``.

The work lives in :mod:`lqmod.bench.adapters`; this script keeps the committed SmolLM2 command and
its defaults (one NF3 base, block 64, double quantization; rank 8, alpha 16; 8 steps x 4 x 128
tokens of packed WikiText-2 validation, lr 1e-3; perplexity on the first 4096 tokens of WikiText-2
raw test at context 256):

    OMP_NUM_THREADS=1 python benchmarks/bench_adapters.py            # ~15 min on a busy 2-core CPU
    OMP_NUM_THREADS=1 python benchmarks/bench_adapters.py --model minilm --steps 40 --name adapters_minilm

Writes ``benchmarks/results/<name>.{json,md,png}`` (default name ``adapters_smollm2``). Since the
move into ``lqmod bench`` the JSON has the mode's schema (``lqmod.bench_adapters/1``: a list of
bases, each with its variants), and the variants' own parameters are reported generically (mean
|change| of every adapter parameter beyond A and B) instead of per-variant formulas.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    from lqmod.bench.command import main as bench_main

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--bases", default="nf:bits=3,blocksize=64,double_quant=true")
    p.add_argument("--adapters", default=None, help="variant names, e.g. lora,dora,iec (default: all registered)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-context", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--name", default="adapters_smollm2")
    args = p.parse_args(argv)
    forward = ["bench", "adapters", "--model", args.model, "--bases", args.bases, "--steps", str(args.steps),
               "--batch", str(args.micro_batch), "--seq-len", str(args.seq_len), "--lr", str(args.lr),
               "--rank", str(args.rank), "--eval-tokens", str(args.eval_tokens),
               "--eval-context", str(args.eval_context), "--seed", str(args.seed), "--out", str(args.out),
               "--name", args.name]  # fmt: skip
    if args.adapters:
        forward += ["--adapters", args.adapters]
    return bench_main(forward)


if __name__ == "__main__":
    sys.exit(main())
