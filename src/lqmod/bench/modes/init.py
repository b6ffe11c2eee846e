"""``lqmod bench init``: step-0 LoRA initialization over quantized bases (:mod:`lqmod.bench.init_bench`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register", "run"]

EPILOG = """\
examples:
  lqmod bench init --model minilm                        # the default matrix; rows cached as measured
  lqmod bench init --model smollm2 --rows nf4            # compute only rows whose label holds 'nf4'
  lqmod bench init --model minilm --report-only          # tables and plot from the cache alone
  lqmod bench init --model minilm --bases "quip3=quip:bits=3;quip4=quip:bits=4" \\
      --inits "default;quailora:method=als;quailora-exact=quailora:method=exact"

specs: [label=]name[:key=value,...] joined by ';'. Every base is crossed with every initializer; an
initializer a+b chains b over the base a returned (keys b.<field> configure b). Without --bases/--inits
the default matrix of the model's kind runs (those rows whose plug-ins are registered).
"""


def register(modes: argparse._SubParsersAction) -> None:
    from lqmod.bench.step0 import WorkloadSettings

    d = WorkloadSettings(model="minilm")
    p = modes.add_parser(
        "init",
        help="step-0 LoRA initialization (default, lq-lora, quailora ...) over quantized bases",
        description="Quantize every linear layer of a real model with each base, start the adapters with each "
        "initializer, and report per-layer weight and calibrated output error at step 0 and end fidelity "
        "(encoder: cosine to fp embeddings; causal LM: perplexity).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="minilm", help="minilm | smollm2 | a local transformers directory or .gguf file")
    p.add_argument("--bases", default=None, help='base quantizer specs, e.g. "nf4=nf:bits=4,blocksize=64"')
    p.add_argument("--inits", default=None, help='initializer specs, e.g. "default;quailora:method=exact"')
    p.add_argument("--rows", default=None, help="comma-separated label substrings: compute only matching rows")
    p.add_argument("--n-calib", type=int, default=None, help="calibration sentences (encoder, 256) or windows (LM, 16)")
    p.add_argument("--n-eval", type=int, default=d.n_eval, help="encoder: held-out sentences (x2)")
    p.add_argument("--ctx", type=int, default=d.ctx, help="causal LM: tokens per calibration/perplexity window")
    p.add_argument("--ppl-tokens", type=int, default=d.ppl_tokens, help="causal LM: perplexity tokens")
    p.add_argument("--rank", type=int, default=d.rank, help="adapter rank")
    p.add_argument("--alpha", type=float, default=d.alpha, help="adapter alpha (scaling alpha / rank)")
    p.add_argument("--reference", default="default", help="initializer label the others are compared against")
    p.add_argument("--versus", default="lq-lora", help="further comparison labels, comma-separated ('' for none)")
    p.add_argument("--cache", type=Path, default=d.cache, help="row and statistics cache folder")
    p.add_argument("--report-only", action="store_true", help="write the report from cached rows, compute nothing")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON, Markdown, PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lqmod.bench.init_bench import InitBenchSettings, rows_from_specs, run_init_bench
    from lqmod.bench.matrix import SpecError
    from lqmod.bench.step0 import WorkloadSettings
    from lqmod.data import DataNotFoundError

    def fail(msg: str) -> int:
        print(f"lqmod bench init: {msg}", file=sys.stderr)
        return 2

    for flag in ("n_calib", "n_eval", "ctx", "ppl_tokens", "rank"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            return fail(f"--{flag.replace('_', '-')} {value}: must be a positive integer")
    if not args.alpha > 0:
        return fail(f"--alpha {args.alpha}: must be a positive number")
    if (args.bases is None) != (args.inits is None):
        return fail("give both --bases and --inits (every base crossed with every initializer), or neither")
    try:  # malformed specs and unknown plug-ins are refused before the model loads
        if args.bases is not None:
            rows_from_specs(args.bases, args.inits)
    except SpecError as exc:
        return fail(str(exc))
    settings = InitBenchSettings(
        workload=WorkloadSettings(model=args.model, n_calib=args.n_calib, n_eval=args.n_eval, ctx=args.ctx,
                                  ppl_tokens=args.ppl_tokens, rank=args.rank, alpha=args.alpha, cache=args.cache,
                                  progress=not args.no_progress),
        bases=args.bases, inits=args.inits, rows=args.rows, report_only=args.report_only, reference=args.reference,
        versus=tuple(v.strip() for v in args.versus.split(",") if v.strip()), out=args.out,
    )  # fmt: skip
    try:
        results = run_init_bench(settings)
    except (DataNotFoundError, FileNotFoundError, SpecError) as exc:
        return fail(str(exc))
    missing = sum(r.get("status") == "missing" for r in results["rows"])
    print(f"{len(results['rows']) - missing} of {len(results['rows'])} rows measured"
          + (f"; {missing} missing (not computed: see --rows)" if missing else ""))  # fmt: skip
    return 0
