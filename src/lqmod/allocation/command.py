"""The ``lqmod plan`` subcommand (wired into the CLI by ``lqmod.cli`` through :func:`register`)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["kfac_fisher_stats", "print_summary", "register", "run_command", "write_plan"]

EPILOG = """\
examples:
  lqmod plan --model minilm --budget 3.25 --out plan.json
  lqmod plan --model minilm --budget 12MiB --allocator greedy --quantizers nf,rtn --out plan.json
  lqmod plan --model smollm2 --budget 2.75 --fisher --calib-text wikitext2 --n-calib 64 --out plan.json
  lqmod plan --model smollm2 --budget 3.25 --error output --calib-text wikitext2 --n-calib 64 --out plan.json
  lqmod plan --model minilm --budget 3.25 --error kfac --n-calib 128 --out plan.json
  lqmod quantize minilm --plan plan.json --out ckpt

budget: average bits per parameter of the quantized matrices ('3.25', '3.25bits') or their total
size in bytes ('40MB', '12MiB', '1234567B'). Error-table rows are cached under $LQMOD_CACHE
(default ~/.cache/lqmod), so a second plan of the same model is instant.

error measures (--error): frobenius ||W - Q||^2 (weight space); fisher, the diagonal-Fisher
weighted one (same as --fisher); output, the calibrated output error tr((W - Q) H (W - Q)^T) / n
with H = sum x x^T of each layer's inputs on the calibration text (also what lets OPTQ and the
QuIP#-like quantizer, which need H, into the table); kfac, the K-FAC second-order loss change
sum_i G_i (dW H dW^T)_ii / n with each output's squared loss gradient G_i read off the diagonal
Fisher, so layers are weighed by how much the loss cares (needs both the Fisher and H). The
Hessians go through the statistics cache (--calib-cache, as `lqmod calibrate` and `lqmod
quantize --calib-cache` use it).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from lqmod.calibration.command import add_sink_options

    p = subparsers.add_parser(
        "plan",
        help="choose a quantizer and config per matrix under a storage budget (error table + allocator)",
        description="Quantize every target matrix with every registered option, record error and exact bits, "
        "and let an allocator plug-in pick one option per matrix within the budget; writes a plan JSON "
        "that `lqmod quantize --plan` reads.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="minilm", help="minilm | smollm2 | a local transformers directory or .gguf file")
    p.add_argument("--budget", required=True, help="avg bits/param ('3.25') or bytes ('12MB', '12MiB', '123B')")
    p.add_argument("--allocator", default="ilp", help="a registered allocator: ilp (optimal), greedy, ...")
    p.add_argument("--allocator-config", default="", help="key=value pairs, e.g. time_limit=30,mip_rel_gap=0")
    p.add_argument("--quantizers", default=None, help="comma-separated quantizer names (default: all registered)")
    p.add_argument("--include", nargs="*", help="regexes of module names to quantize")
    p.add_argument("--exclude", nargs="*", help="regexes of module names to leave alone")
    p.add_argument("--fisher", action="store_true", help="weight errors by a diagonal Fisher (= --error fisher)")
    p.add_argument(
        "--error",
        choices=("auto", "frobenius", "fisher", "output", "kfac"),
        default="auto",
        help="error measure of the table (default auto: fisher with --fisher, else frobenius); output = "
        "tr(dW H dW^T)/n from calibration Hessians; kfac = Fisher-weighted output error (Fisher and Hessians)",
    )
    p.add_argument(
        "--calib-text", default="wikitext2", help="calibration text: wikitext2 (--fisher); wikitext2 | ptb | a file"
    )
    p.add_argument("--n-calib", type=int, default=64, help="calibration sequences (sentences or token windows)")
    p.add_argument(
        "--hessian",
        action="store_true",
        help="gather calibration Hessians, so quantizers that need them (optq, quip) enter the table whatever "
        "the error measure (implied by --error output and --error kfac)",
    )
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window (Hessians)")
    add_sink_options(p, "calib-")
    p.add_argument(
        "--calib-cache", default=None, help="statistics cache folder for the Hessians (default $LQMOD_CACHE/stats)"
    )
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="error-table cache (default $LQMOD_CACHE or ~/.cache/lqmod)"
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the error-table cache")
    p.add_argument("--out", type=Path, required=True, help="plan JSON to write")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_command)


def write_plan(plan: Any, path: Path, *, overwrite: bool = False) -> None:
    """Write a plan as JSON atomically (temp file + rename): a reader never sees half a plan."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make the plan private to its writer
        with os.fdopen(fd, "w") as f:
            f.write(plan.model_dump_json(indent=2))
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _calibration_texts(name: str, n: int, kind: str) -> list[str]:
    from lqmod.data import wikitext_paragraphs, wikitext_sentences

    if name.lower() not in ("wikitext2", "wikitext-2", "wikitext"):
        raise ValueError(f"--calib-text {name!r} is not known; accepted: wikitext2")
    texts = wikitext_sentences() if kind == "encoder" else wikitext_paragraphs()
    if n < 1:
        raise ValueError(f"--n-calib must be at least 1, got {n}")
    return texts[:n]


def fisher_stats(
    model: Any, tokenizer: Any, names: list[str], texts: list[str], *, progress: bool = True
) -> dict[str, Any]:
    """Diagonal Fisher per target matrix, through ``lqmod.calibration.diagonal_fisher``."""
    try:
        from lqmod.calibration import diagonal_fisher, text_batches
    except ImportError as exc:
        raise ValueError(
            "--fisher needs lqmod.calibration.diagonal_fisher, which this installation lacks; "
            "plan without --fisher (Frobenius error) instead"
        ) from exc
    from lqmod.types import LayerStats

    batches = text_batches(tokenizer, texts, batch_size=8, max_length=128)
    fisher = diagonal_fisher(model, names, batches, progress=progress)
    return {n: LayerStats(fisher=f) for n, f in fisher.items()}


def kfac_fisher_stats(
    model: Any, tokenizer: Any, model_kind: str, names: list[str], args: argparse.Namespace, *, progress: bool = True
) -> dict[str, Any]:
    """Diagonal Fisher on the very batches the Hessians are gathered from.

    kfac reads each output's squared gradient off ``F`` by dividing by the mean ``||x||^2`` that
    ``H`` measures, which holds when both saw the same tokens.
    """
    from lqmod.calibration import diagonal_fisher
    from lqmod.calibration.text import calibration_batches
    from lqmod.types import LayerStats

    batches = calibration_batches(tokenizer, model_kind, args.calib_text, args.n_calib, length=args.calib_seq_len)
    fisher = diagonal_fisher(model, names, batches, progress=progress)
    return {n: LayerStats(fisher=f) for n, f in fisher.items()}


def _error_measure(args: argparse.Namespace) -> str:
    """--error, with --fisher as its older spelling; a clash is an error, not a silent choice."""
    error = str(getattr(args, "error", "auto"))
    if args.fisher:
        if error not in ("auto", "fisher"):
            raise ValueError(f"--fisher asks for the Fisher-weighted error but --error is {error!r}; give one of them")
        return "fisher"
    return error


def hessian_stats(
    model: Any, tokenizer: Any, model_kind: str, names: list[str], args: argparse.Namespace, *, progress: bool = True
) -> dict[str, Any]:
    """``X^T X`` of every target's input on the calibration text, read from / written to the stats cache."""
    from lqmod.calibration.cache import StatsCache
    from lqmod.calibration.command import compute_stats, sink_from_args
    from lqmod.calibration.text import calibration_batches

    sink = sink_from_args(args, model_kind=model_kind)
    batches = calibration_batches(tokenizer, model_kind, args.calib_text, args.n_calib, length=args.calib_seq_len)
    cache_dir = str(StatsCache(args.calib_cache).root)
    return compute_stats(model, names, batches, {"hessian"}, cache_dir=cache_dir, text=args.calib_text,
                         progress=progress, sink=sink)


def run_command(args: argparse.Namespace) -> int:
    from lqmod.allocation.budget import parse_budget
    from lqmod.allocation.options import parse_quantizer_list
    from lqmod.allocation.planner import plan_model
    from lqmod.cli import parse_kv
    from lqmod.config import TargetConfig, validate_config
    from lqmod.hf import load_local_model
    from lqmod.model import find_targets
    from lqmod.plugins import get_registry
    from lqmod.types import LayerStats

    # Everything checkable is checked before the (slow) model load and table build.
    budget = parse_budget(args.budget)
    registry = get_registry()
    spec = registry.allocator(args.allocator)
    allocator_config = parse_kv(args.allocator_config)
    validate_config(spec.config_model, allocator_config, what=f"{args.allocator} allocator config")
    quantizers = parse_quantizer_list(args.quantizers)
    for q in quantizers or ():
        registry.quantizer(q)
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    targets = TargetConfig(
        **({"include": tuple(args.include)} if args.include else {}),
        **({"exclude": tuple(args.exclude)} if args.exclude else {}),
    )
    error = _error_measure(args)
    model, tokenizer, where = load_local_model(args.model)
    stats = None
    names = find_targets(model, targets)
    if error == "fisher":
        texts = _calibration_texts(args.calib_text, args.n_calib, where.kind)
        stats = fisher_stats(model, tokenizer, names, texts, progress=not args.no_progress)
    elif error == "kfac":
        stats = kfac_fisher_stats(model, tokenizer, where.kind, names, args, progress=not args.no_progress)
    if error in ("output", "kfac") or getattr(args, "hessian", False):
        hess = hessian_stats(model, tokenizer, where.kind, names, args, progress=not args.no_progress)
        stats = hess if stats is None else {
            n: LayerStats(h.hessian, h.n_tokens, stats[n].fisher, h.act_absmean) for n, h in hess.items()
        }
    cache: Any = False if args.no_cache else args.cache_dir
    plan, summary = plan_model(
        model,
        budget,
        allocator=args.allocator,
        allocator_config=allocator_config,
        quantizers=quantizers,
        targets=targets,
        stats=stats,
        cache=cache,
        registry=registry,
        progress=not args.no_progress,
        error=error,
    )
    summary["model"] = str(where.path)
    write_plan(plan.model_copy(update={"summary": summary}), args.out, overwrite=args.overwrite)
    print_summary(summary)
    print(f"wrote {args.out}")
    return 0


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    table = Table(title=f"plan: {summary['n_matrices']} matrices, {summary['n_params'] / 1e6:.2f}M params")
    for col in ("option", "matrices", "params", "bits/param"):
        table.add_column(col, justify="left" if col == "option" else "right")
    for label, row in summary["by_option"].items():
        table.add_row(label, str(row["matrices"]), f"{row['params']:,}", f"{row['bits_per_param']:.4f}")
    console.print(table)
    b, a = summary["budget"], summary["achieved"]
    gap = "" if summary["gap"] is None else f", gap {summary['gap']:.2g}"
    solver = summary.get("solver") or {}
    pruned = f", {solver['dominated_pruned']} dominated options pruned" if "dominated_pruned" in solver else ""
    console.print(
        f"budget {b['bits_per_param']:.4f} bits/param ({b['bytes'] / 2**20:.3f} MiB); achieved "
        f"{a['bits_per_param']:.4f} bits/param ({a['bytes'] / 2**20:.3f} MiB); total {summary['error_weighting']} "
        f"error {summary['total_error']:.6g}",
        highlight=False,
    )
    uni = summary.get("best_uniform")
    if uni:
        console.print(
            f"best uniform option within budget: {uni['option']} at {uni['bits_per_param']:.4f} bits/param, "
            f"error {uni['total_error']:.6g}",
            highlight=False,
        )
    console.print(
        f"allocator {summary['allocator']}: {summary['status']}{gap}{pruned}, solved in "
        f"{summary['solve_seconds']:.3f} s; table: {summary['table']['computed']} quantized, "
        f"{summary['table']['cached']} from cache",
        highlight=False,
    )
    skipped = summary.get("skipped") or {}
    if skipped:
        console.print(f"{len(skipped)} option(s) skipped for some matrices (reasons in the plan's summary)")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m lqmod.allocation.command``) until the CLI wires ``plan`` in."""
    parser = argparse.ArgumentParser(prog="lqmod")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
