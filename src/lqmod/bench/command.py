"""The ``lqmod bench`` subcommand (wired into the CLI by ``lqmod.cli`` through :func:`register`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register", "run_command"]

EPILOG = """\
examples:
  lqmod bench --model minilm --quick
  lqmod bench --model minilm --quantizers "nf:bits=4,blocksize=64;rtn:bits=4" --baselines "bnb-nf4:blocksize=64"
  lqmod bench --model smollm2 --baselines none --finetune-steps 10 --out benchmarks/results
  lqmod bench adapters --model minilm      (a mode: lqmod bench MODE --help; its options after its name)

specs: name or name:key=value,...; rows joined with ';'. Baselines: bnb-nf4, bnb-fp4, hqq,
loftq, torchao-nf4, gptq (a row that cannot run is reported with its reason).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark quantizers and baselines side by side on a real model",
        description="Quantize every linear layer of a real model with each lqmod quantizer and baseline; "
        "report bits/param, weight and layer-output error, end-model fidelity, and a LoRA finetuning run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="minilm", help="minilm | smollm2 | a local transformers directory or .gguf file")
    p.add_argument(
        "--quantizers",
        default=None,
        help='lqmod rows, e.g. "nf:bits=4,blocksize=64;rtn:bits=4" '
        "(default: NF rows plus a bits sweep of every other registered quantizer)",
    )
    p.add_argument(
        "--baselines", default=None, help='baseline rows, e.g. "bnb-nf4:blocksize=64;hqq:bits=3"; "none" for none'
    )
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON, Markdown and PNG files"
    )
    p.add_argument(
        "--n-calib", type=int, default=None, help="calibration sentences (encoder) or token windows (causal LM)"
    )
    p.add_argument("--n-eval", type=int, default=None, help="held-out sentences (encoder) or eval windows (causal LM)")
    p.add_argument("--ctx", type=int, default=256, help="tokens per calibration/training window (causal LM)")
    p.add_argument("--eval-ctx", type=int, default=512, help="tokens per perplexity window (causal LM)")
    p.add_argument("--finetune-steps", type=int, default=0, help="LoRA finetuning steps per method (0: skip)")
    p.add_argument("--finetune-batch", type=int, default=None, help="sequences per finetuning step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny matrix and data (a smoke test in about a minute)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_command)
    from lqmod.bench.modes import register_modes

    # Not required: plain ``lqmod bench`` stays the quantizer matrix.
    register_modes(p.add_subparsers(dest="bench_mode", metavar="MODE", title="modes"))


def run_command(args: argparse.Namespace) -> int:
    from lqmod.bench.matrix import SpecError, parse_specs
    from lqmod.bench.report import print_tables
    from lqmod.bench.run import BenchSettings, run_bench
    from lqmod.data import DataNotFoundError

    try:  # fail on a malformed spec before spending a minute loading the model
        parse_specs(args.quantizers, "lqmod")
        if args.baselines and args.baselines.strip().lower() != "none":
            parse_specs(args.baselines, "baseline")
    except SpecError as exc:
        print(f"lqmod bench: {exc}", file=sys.stderr)
        return 2
    settings = BenchSettings(
        model=args.model,
        quantizers=args.quantizers,
        baselines=args.baselines,
        out=args.out,
        n_calib=args.n_calib,
        n_eval=args.n_eval,
        finetune_steps=args.finetune_steps,
        seed=args.seed,
        quick=args.quick,
        ctx=args.ctx,
        eval_ctx=args.eval_ctx,
        progress=not args.no_progress,
        extra={"finetune_batch": args.finetune_batch} if args.finetune_batch else {},
    )
    try:
        results = run_bench(settings)
    except (DataNotFoundError, FileNotFoundError) as exc:
        print(f"lqmod bench: {exc}", file=sys.stderr)
        return 2
    print_tables(results)
    failed = [r["label"] for r in results["rows"] if r["status"] != "ok"]
    print(
        f"wrote {args.out}/bench_{results['model']['name']}.* in {results['seconds']:.0f} s"
        + (f"; {len(failed)} row(s) could not run (see table)" if failed else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m lqmod.bench.command``) until the CLI wires ``bench`` in."""
    parser = argparse.ArgumentParser(prog="lqmod")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
