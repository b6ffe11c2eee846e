"""``lqmod bench icq``: an entropy-raising wrapper (ICQ) vs its plain base at equal bits (:mod:`lqmod.bench.icq`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register", "run"]

EPILOG = """\
examples:
  lqmod bench icq --model minilm
  lqmod bench icq --model smollm2 --rows nf3,nf4 --ppl-tokens 2048
  lqmod bench icq --model minilm --bases "nf:bits=3,blocksize=64;rtn:bits=3,group_size=64,symmetric=true"
  lqmod bench icq --model minilm --report-only      (tables and plot from the row cache)

bases: quantizer specs joined by ';'. Each gives three rows: the plain base, the wrapper over it,
and the plain base at half the block (what the wrapper's 8-bit shifts cost: equal bits). Default:
NF2-4 (block 64 and 128) for an encoder, NF2-4 at 64/32 and a symmetric integer grid for a causal LM.
"""


def register(modes: argparse._SubParsersAction) -> None:
    p = modes.add_parser(
        "icq",
        help="ICQ (entropy-raising per-block shift) vs the plain base: entropy, errors, fidelity",
        description="Quantize every layer of a real model with a plain LUT-style base and with the wrapper "
        "over it; report mean code entropy, weight and calibrated output error, exact bits/param and the "
        "end metric (encoder: embedding cosine to fp32; causal LM: perplexity). Rows are cached as measured.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="minilm", help="minilm | smollm2 | a local transformers directory or .gguf file")
    p.add_argument("--bases", default=None, help='plain base specs, e.g. "nf:bits=3,blocksize=64;rtn:bits=4"')
    p.add_argument("--wrapper", default="icq", help="registered wrapper quantizer (config: base, base_config, tau_n)")
    p.add_argument("--tau-n", type=int, default=None, help="shift candidates per side (default: 12 encoder, 4 LM)")
    p.add_argument("--rows", default=None, help="label substrings joined by , (=label: that row only)")
    p.add_argument("--n-calib", type=int, default=None, help="calibration sentences (256) or windows (16)")
    p.add_argument("--n-eval", type=int, default=256, help="encoder: held-out sentences (x2: statistics + cosine)")
    p.add_argument("--ctx", type=int, default=256, help="causal LM: calibration window and perplexity context")
    p.add_argument("--ppl-tokens", type=int, default=2048, help="causal LM: perplexity tokens of WikiText-2 test")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lqmod" / "bench_init",
                   help="row and statistics cache (shared with bench init: the ICQ rows were first measured there)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON, Markdown, PNG")
    p.add_argument("--name", default=None, help="output file stem (default: icq for minilm, else icq_<model>)")
    p.add_argument("--report-only", action="store_true", help="write the report from cached rows, compute nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lqmod.bench.icq import IcqBenchSettings, run_icq_bench, select_rows
    from lqmod.bench.matrix import SpecError
    from lqmod.data import DataNotFoundError

    def fail(msg: str) -> int:
        print(f"lqmod bench icq: {msg}", file=sys.stderr)
        return 2

    for flag in ("tau_n", "n_calib", "n_eval", "ctx", "ppl_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            return fail(f"--{flag.replace('_', '-')} {value}: must be a positive integer")
    settings = IcqBenchSettings(
        model=args.model, bases=args.bases, wrapper=args.wrapper, tau_n=args.tau_n, rows=args.rows,
        n_calib=args.n_calib, n_eval=args.n_eval, ctx=args.ctx, ppl_tokens=args.ppl_tokens, cache=args.cache,
        out=args.out, name=args.name, report_only=args.report_only, progress=not args.no_progress,
    )  # fmt: skip
    try:  # malformed specs, unknown quantizers and invalid configs are refused before the model loads
        select_rows(settings, "encoder")
    except SpecError as exc:
        if not (args.rows and "matches no row" in str(exc)):  # a causal LM's rows differ: checked once loaded
            return fail(str(exc))
    try:
        results = run_icq_bench(settings)
    except (DataNotFoundError, FileNotFoundError, SpecError) as exc:
        return fail(str(exc))
    done = sum(1 for r in results["rows"] if r.get("status") != "missing")
    print(f"lqmod bench icq: {done}/{len(results['rows'])} rows measured, report in {args.out}")
    return 0
