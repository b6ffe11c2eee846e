"""Quantizer x initializer LoRA finetuning benchmark on SmolLM2-135M (issue 11, part 3).

Rows (``--list``): NF4/NF3/NF2, sequential OPTQ 3/2, QuIP#-like 3/2 and ILP plans at 3.25 and
2.75 bits/param, each with the default and the ``lq-lora`` initializer; bitsandbytes + PEFT
QLoRA NF4; PEFT LoRA on the fp32 model. Columns: bits/param, held-out perplexity before and
after the same training tokens, peak RSS growth while training, tokens/s.

Resumable: a rerun computes only rows without a current result under ``--out/rows/``;
calibration statistics, error tables, plans, quantized checkpoints and training states are
cached under ``--cache`` (default ``$LQMOD_CACHE/finetune_lm`` or ``~/.cache/lqmod/finetune_lm``).
The lqmod module behind it is :mod:`lqmod.bench.finetune_lm`.

Usage:
  python benchmarks/bench_finetune_lm.py                                # the default rows, full settings
  python benchmarks/bench_finetune_lm.py --rows all                     # all 20 rows (hours on 2 cores)
  python benchmarks/bench_finetune_lm.py --rows 'nf3*,fp-lora'          # a subset (names or patterns)
  python benchmarks/bench_finetune_lm.py --quick --model DIR --train-text a.txt --eval-text b.txt \
      --calib-text c.txt --out /tmp/x                                   # smoke run on a tiny model
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from lqmod.bench.finetune_lm import FULL

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune_lm"))
    p.add_argument("--cache", type=Path, default=None, help="cache folder (statistics, plans, checkpoints, runs)")
    p.add_argument("--rows", default=None,
                   help="comma-separated row names or shell patterns, or all (default: DEFAULT_ROWS, see --list)")
    p.add_argument("--quick", action="store_true", help="tiny settings for tests and smoke runs")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    p.add_argument("--report-only", action="store_true",
                   help="compute nothing: rewrite the JSON, markdown and plots from the row files under --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    # Every setting can be overridden; an override is recorded in the results (settings.name = custom).
    for f in fields(FULL):
        if f.name == "name":
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(FULL, f.name)), default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from lqmod.bench.finetune_lm import DEFAULT_ROWS, FULL, QUICK, ROWS, run_benchmark, select_rows

    args = parse_args(argv)
    if args.list:
        for r in ROWS:
            print(f"{'*' if r.name in DEFAULT_ROWS else ' '} {r.name:16s} {r.description}")
        print("(* = computed by a plain run; --rows all for every row)")
        return 0
    try:
        rows = select_rows(args.rows)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = QUICK if args.quick else FULL
    overrides = {f.name: getattr(args, f.name) for f in fields(FULL) if f.name != "name"}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        settings = replace(settings, **overrides, name=f"{settings.name}, custom")
    run = run_benchmark(settings, args.out, rows=[] if args.report_only else rows, cache=args.cache,
                        progress=not args.no_progress, plots=not args.no_plots)
    print(f"computed {len(run.computed)} rows {run.computed}, reused {len(run.reused)}, failed {run.failed}")
    for kind, path in run.paths.items():
        print(f"wrote {kind}: {path}")
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
