"""``lqmod bench adapters``: adapter variants after the same finetuning budget (:mod:`lqmod.bench.adapters`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register", "run"]

EPILOG = """\
examples:
  lqmod bench adapters --model minilm --steps 40
  lqmod bench adapters --model minilm --bases "nf:bits=4,blocksize=64,double_quant=true" --adapters lora,dora
  lqmod bench adapters --model smollm2 --steps 8 --batch 4

bases: quantizer specs joined by ';' (default: NF4, NF3 and OPTQ-3 for an encoder, NF3 for a causal LM,
those whose quantizer is registered); adapters: variant names joined by ',' (default: every registered one).
"""


def register(modes: argparse._SubParsersAction) -> None:
    p = modes.add_parser(
        "adapters",
        help="adapter variants (LoRA, DoRA, IEC ...) after the same finetuning budget",
        description="Quantize a real model once per base, convert its adapters to each registered variant "
        "(same initial A and B), train each for the same steps on the same batches, and report the metric "
        "before and after, trainable parameters, peak RSS and time.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="minilm", help="minilm | smollm2 | a local transformers directory or .gguf file")
    p.add_argument("--bases", default=None, help='quantizer specs, e.g. "nf:bits=3,blocksize=64;optq:bits=3"')
    p.add_argument("--adapters", default=None, help="variant names, e.g. lora,dora,iec (default: all registered)")
    p.add_argument("--steps", type=int, default=None, help="finetuning steps (default: 40 encoder, 8 causal LM)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: 16 encoder, 4 causal LM)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-calib", type=int, default=None, help="calibration sentences/windows (bases needing them)")
    p.add_argument("--n-eval", type=int, default=None, help="encoder: held-out sentences (default 1000)")
    p.add_argument("--seq-len", type=int, default=128, help="causal LM: tokens per training window")
    p.add_argument("--eval-tokens", type=int, default=4096, help="causal LM: perplexity tokens")
    p.add_argument("--eval-context", type=int, default=256, help="causal LM: perplexity context")
    p.add_argument("--no-layer-timing", action="store_true", help="skip the one-layer forward+backward timing")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON, Markdown, PNG")
    p.add_argument("--name", default=None, help="output file stem (default: adapters_<model>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lqmod.bench.adapters import AdapterBenchSettings, run_adapter_bench, select_bases, select_variants
    from lqmod.bench.matrix import SpecError
    from lqmod.data import DataNotFoundError

    def fail(msg: str) -> int:
        print(f"lqmod bench adapters: {msg}", file=sys.stderr)
        return 2

    for flag in ("steps", "batch", "rank", "n_calib", "n_eval", "seq_len", "eval_tokens", "eval_context"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            return fail(f"--{flag.replace('_', '-')} {value}: must be a positive integer")
    if args.lr is not None and not args.lr > 0:
        return fail(f"--lr {args.lr}: must be a positive number, e.g. 1e-3")
    try:  # malformed or unknown names are refused before the model loads
        select_variants(args.adapters)
        if args.bases is not None:
            select_bases(args.bases, "encoder")
    except SpecError as exc:
        return fail(str(exc))
    settings = AdapterBenchSettings(
        model=args.model, bases=args.bases, adapters=args.adapters, steps=args.steps, batch=args.batch, lr=args.lr,
        rank=args.rank, seed=args.seed, n_calib=args.n_calib, n_eval=args.n_eval, seq_len=args.seq_len,
        eval_tokens=args.eval_tokens, eval_context=args.eval_context, layer_timing=not args.no_layer_timing,
        out=args.out, name=args.name, progress=not args.no_progress,
    )  # fmt: skip
    try:
        results = run_adapter_bench(settings)
    except (DataNotFoundError, FileNotFoundError, SpecError) as exc:
        return fail(str(exc))
    print(f"wrote {args.out}/{args.name or 'adapters_' + results['model']['name']}.{{json,md,png}} "
          f"in {results['seconds']:.0f} s")  # fmt: skip
    return 0
