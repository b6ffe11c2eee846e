"""``lqmod calibrate`` and the calibration options of ``lqmod quantize``."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lqmod.calibration.sinks import SinkWeighting, parse_sink_share, resolve_auto
from lqmod.types import LayerStats

__all__ = [
    "add_quantize_options", "compute_stats", "quantize_with_calibration", "register", "sink_from_args",
    "stats_for_quantize",
]

KINDS = ("hessian", "fisher")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="compute calibration statistics (Hessians or a diagonal Fisher) on real text and cache them",
        description="Gather X^T X of every targeted linear layer's input (kind hessian) or the diagonal empirical "
        "Fisher of its weight (kind fisher) on real text, store them in the statistics cache, and print the "
        "cache key and a per-layer summary. quantize --calib-cache DIR reuses them.",
    )
    p.add_argument("--model", required=True, help="minilm | smollm2 | a local transformers directory or .gguf file")
    p.add_argument("--text", default="wikitext2", help="wikitext2 (validation split) | ptb | a UTF-8 file")
    p.add_argument("--n", type=int, default=128, help="sentences (encoder) or token windows (causal LM)")
    p.add_argument("--kind", choices=KINDS, default="hessian")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (causal LM)")
    p.add_argument("--batch-size", type=int, default=8, help="sentences per batch (encoder)")
    add_sink_options(p, "")
    p.add_argument("--cache", default=None, help="cache folder (default: $LQMOD_CACHE or ~/.cache/lqmod/stats)")
    p.add_argument("--include", nargs="*", help="regexes of module names (default: every linear but heads)")
    p.add_argument("--exclude", nargs="*", help="regexes of module names to leave out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_calibrate)


def add_quantize_options(q: argparse.ArgumentParser) -> None:
    """Calibration options of ``lqmod quantize`` (used only when a chosen quantizer needs statistics)."""
    q.add_argument("--calib-text", default=None, help="calibration text: wikitext2 | ptb | a UTF-8 file")
    q.add_argument("--n-calib", type=int, default=128, help="calibration sentences (encoder) or token windows")
    q.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window (causal LM)")
    q.add_argument(
        "--sequential",
        action="store_true",
        help="GPTQ-style: quantize block by block, each block's Hessians taken on the quantized blocks' outputs",
    )
    q.add_argument("--calib-cache", default=None, help="statistics cache folder to read and fill")
    add_sink_options(q, "calib-")


def add_sink_options(p: argparse.ArgumentParser, prefix: str) -> None:
    """``--{prefix}sink-share``, ``--{prefix}sink-tokens`` and ``--{prefix}skip-first``."""
    p.add_argument(
        f"--{prefix}sink-share",
        type=parse_sink_share,
        default="auto",
        metavar="S",
        help="re-weight the first --sink-tokens tokens of every calibration window (a causal LM's attention "
        "sink) to carry S of each layer's tr(X^T X); 'none' keeps the natural weights; 'auto' (default) is 0.5 "
        "for causal LMs and 'none' for encoders. Measured on SmolLM2, OPTQ-3 needs 0.5 to beat NF3 "
        "(plugins/lqmod_optq/README.md)",
    )
    p.add_argument(f"--{prefix}sink-tokens", type=int, default=1, metavar="K",
                   help="tokens at the start of each window that --sink-share re-weights (default 1)")
    p.add_argument(
        f"--{prefix}skip-first",
        type=int,
        default=0,
        help="leave the first N tokens of every calibration window out of the Hessians (default 0; the same as "
        "--sink-share 0 --sink-tokens N). Measured *worse* for OPTQ on SmolLM2: the sink's output must stay exact",
    )


def sink_from_args(
    args: argparse.Namespace, prefix: str = "calib_", *, model_kind: str | None = None
) -> SinkWeighting | None:
    """The sink weighting the ``add_sink_options`` flags ask for (None: natural weights);
    ``model_kind`` resolves ``auto`` (``causal-lm``: re-weighted, anything else: natural)."""
    skip = int(getattr(args, f"{prefix}skip_first", 0) or 0)
    raw = getattr(args, f"{prefix}sink_share", None)
    if skip and raw == "auto":
        raw = None  # an explicit --skip-first overrides the default
    share = resolve_auto(raw, model_kind)
    tokens = int(getattr(args, f"{prefix}sink_tokens", 1) or 1)
    if skip and share is not None:
        raise ValueError(
            "give --skip-first or --sink-share, not both (--skip-first N is --sink-share 0 --sink-tokens N)"
        )
    if skip < 0 or tokens < 1:
        raise ValueError(f"--skip-first must be >= 0 and --sink-tokens >= 1, got {skip} and {tokens}")
    if skip:
        return SinkWeighting(tokens=skip, share=0.0)
    return None if share is None else SinkWeighting(tokens=tokens, share=share)


def _targets(include: Sequence[str] | None, exclude: Sequence[str] | None) -> Any:
    from lqmod.config import TargetConfig

    return TargetConfig(
        **({"include": tuple(include)} if include else {}), **({"exclude": tuple(exclude)} if exclude else {})
    )


def compute_stats(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[Mapping[str, Any]],
    kinds: set[str],
    *,
    cache_dir: str | None = None,
    text: str = "",
    progress: bool = True,
    sink: SinkWeighting | None = None,
) -> dict[str, LayerStats]:
    """Hessians and/or a Fisher of ``names``, through the cache when ``cache_dir`` is given.

    ``sink`` re-weights (or leaves out) the first tokens of every sequence in the Hessians,
    not in the Fisher.
    """
    from lqmod.calibration.cache import StatsCache
    from lqmod.calibration.fisher import diagonal_fisher, fisher_stats
    from lqmod.calibration.hessian import collect_hessians

    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}: lqmod computes {', '.join(KINDS)}")
    cache = StatsCache(cache_dir) if cache_dir is not None else None
    out: dict[str, LayerStats] = {}
    for kind in sorted(kinds):
        def compute(kind: str = kind) -> dict[str, LayerStats]:
            if kind == "hessian":
                return collect_hessians(model, names, batches, progress=progress, sink=sink)
            return fisher_stats(diagonal_fisher(model, names, batches, progress=progress))

        if cache is None:
            got = compute()
        else:
            key = _stats_key(cache, model, names, batches, kind, sink)
            loaded = cache.load(key)
            if loaded is None:
                got = compute()
                cache.save(key, got, meta={"kind": kind, "text": text, "n_batches": len(batches)})
            else:
                got = loaded
        for name, s in got.items():
            prev = out.get(name)
            out[name] = s if prev is None else LayerStats(
                prev.hessian if prev.hessian is not None else s.hessian,
                max(prev.n_tokens, s.n_tokens),
                prev.fisher if prev.fisher is not None else s.fisher,
                prev.act_absmean if prev.act_absmean is not None else s.act_absmean,
            )
    return out


def _stats_key(cache: Any, model: nn.Module, names: Sequence[str], batches: Sequence[Mapping[str, Any]], kind: str,
               sink: SinkWeighting | None) -> str:
    # Keys with natural weights stay those of earlier versions (their entries stay valid).
    extra = sink.cache_extra() if kind == "hessian" and sink is not None else {}
    return str(cache.key(model, names, batches, kind, **extra))


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lqmod.calibration.cache import StatsCache
    from lqmod.calibration.text import calibration_batches
    from lqmod.hf import load_local_model
    from lqmod.model import find_targets

    console = Console(width=110)
    model, tokenizer, where = load_local_model(args.model)
    names = find_targets(model, _targets(args.include, args.exclude))
    if not names:
        raise ValueError("no linear layer matches --include/--exclude")
    batches = calibration_batches(
        tokenizer, where.kind, args.text, args.n, length=args.seq_len, batch_size=args.batch_size
    )
    sink = sink_from_args(args, "", model_kind=where.kind)
    cache = StatsCache(args.cache)
    key = _stats_key(cache, model, names, batches, args.kind, sink)
    hit = cache.load(key) is not None
    stats = compute_stats(model, names, batches, {args.kind}, cache_dir=str(cache.root), text=args.text,
                          progress=not args.no_progress, sink=sink)
    table = Table(title=f"{args.kind} of {len(stats)} layers, {where.name}, {args.text} (n={args.n})")
    for col in ("layer", "shape", "tokens", "mean diag" if args.kind == "hessian" else "mean fisher", "max"):
        table.add_column(col)
    for name in names:
        s = stats[name]
        t = s.hessian.diagonal() / max(s.n_tokens, 1) if s.hessian is not None else s.fisher
        assert t is not None
        shape = tuple(s.hessian.shape) if s.hessian is not None else tuple(t.shape)
        table.add_row(name, str(shape), str(s.n_tokens), f"{float(t.mean()):.4g}", f"{float(t.max()):.4g}")
    console.print(table)
    console.print(f"{'reused' if hit else 'wrote'} {Path(cache.root) / key}")
    console.print(f"key {key}")
    return 0


def stats_for_quantize(model: nn.Module, tokenizer: Any, model_kind: str, lq: Any, args: argparse.Namespace) -> Any:
    """Statistics the chosen quantizers need (None when none needs any), for ``lqmod quantize``."""
    from lqmod.calibration.text import calibration_batches

    needs = {s for name in lq.entries for s in lq.needs(name)}
    if not needs and not args.sequential:
        return None
    if args.calib_text is None:
        raise ValueError(
            f"the chosen quantizer(s) need calibration statistics {sorted(needs)}: add --calib-text wikitext2 "
            "(or ptb, or a UTF-8 file) and --n-calib N"
        )
    return calibration_batches(tokenizer, model_kind, args.calib_text, args.n_calib, length=args.calib_seq_len)


def quantize_with_calibration(model: nn.Module, tokenizer: Any, model_kind: str, args: argparse.Namespace,
                              **kwargs: Any) -> Any:
    """``quantize_model`` (or the sequential driver) with the statistics its quantizers need."""
    from lqmod.calibration.cache import StatsCache
    from lqmod.calibration.sequential import quantize_model_sequential
    from lqmod.model import LayerQuantizer, quantize_model

    lq = LayerQuantizer(model, kwargs["quantizer"], kwargs["config"], lora=kwargs["lora"],
                        targets=kwargs["targets"], plan=kwargs["plan"], registry=None, seed=0)
    batches = stats_for_quantize(model, tokenizer, model_kind, lq, args)
    if batches is None:
        return quantize_model(model, **kwargs)
    needs = {s for name in lq.entries for s in lq.needs(name)}
    progress = not getattr(args, "no_progress", False)
    sink = sink_from_args(args, model_kind=model_kind)
    if args.sequential:
        given = None
        if needs - {"hessian"}:
            given = compute_stats(model, list(lq.entries), batches, needs - {"hessian"}, cache_dir=args.calib_cache,
                                  text=args.calib_text, progress=progress)
        cache = StatsCache(args.calib_cache) if args.calib_cache else None
        return quantize_model_sequential(model, batches=batches, stats=given, cache=cache, progress=progress,
                                         sink=sink, **kwargs)
    stats = compute_stats(model, list(lq.entries), batches, needs, cache_dir=args.calib_cache, text=args.calib_text,
                          progress=progress, sink=sink)
    return quantize_model(model, stats=stats, **kwargs)

