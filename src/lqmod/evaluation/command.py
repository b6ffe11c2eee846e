"""``lqmod eval``: perplexity of an fp model, an lqmod checkpoint (with or without its
adapters) or a benchmark baseline, on a corpus or any text file."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["evaluate_text", "register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    e = subparsers.add_parser(
        "eval",
        help="perplexity of a model, an lqmod checkpoint or a baseline on real text",
        description="Sliding-window perplexity (windows of --context tokens every --stride tokens, each token "
        "scored once) on the first --max-tokens tokens of --text.",
    )
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="an unquantized model: smollm2 | a local transformers directory | a .gguf")
    what.add_argument("--checkpoint", help="an lqmod checkpoint directory")
    e.add_argument("--baseline", default=None,
                   help="with --model: quantize its linear layers with a baseline first, e.g. bnb-nf4 or hqq:nbits=3")
    e.add_argument("--no-adapters", action="store_true", help="with --checkpoint: the quantized base alone")
    e.add_argument("--base", default=None, help="with --checkpoint: the model whose tokenizer to use "
                   "(default: the one the checkpoint was quantized from)")
    e.add_argument("--text", default="wikitext2", help="wikitext2 | wikitext2-valid | ptb | ptb-valid | a text file")
    e.add_argument("--context", type=int, default=256, help="tokens per window")
    e.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: --context)")
    e.add_argument("--max-tokens", type=int, default=4096, help="score the first N tokens (0: all)")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--json", default=None, help="also write the result as JSON here")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_cmd_eval)


def evaluate_text(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    *,
    context: int = 256,
    stride: int | None = None,
    max_tokens: int | None = 4096,
    batch_size: int = 4,
    progress: bool = False,
) -> dict[str, Any]:
    """Perplexity of ``model`` on a text source (see :func:`lqmod.train.data.source_text`)."""
    import torch

    from lqmod.evaluation.perplexity import stream_perplexity
    from lqmod.train.data import source_text

    ids = torch.tensor(tokenizer(source_text(text), add_special_tokens=False)["input_ids"], dtype=torch.long)
    if max_tokens:
        ids = ids[:max_tokens]
    t0 = time.perf_counter()
    res = stream_perplexity(model, ids, context=context, stride=stride, batch_size=batch_size, progress=progress)
    return {"text": text, **res.as_dict(), "seconds": time.perf_counter() - t0}


def _baseline(model: nn.Module, spec: str) -> str:
    """Swap every linear weight the benchmark would quantize for the baseline's reconstruction."""
    import torch

    from lqmod.bench.matrix import parse_spec
    from lqmod.bench.methods import build_method
    from lqmod.config import TargetConfig
    from lqmod.model import find_targets
    from lqmod.plugins import get_registry

    row = parse_spec(spec, "baseline")
    method = build_method(row, get_registry())
    if method.needs_hessian or method.needs_fisher:
        raise ValueError(f"baseline {spec!r} needs calibration statistics; lqmod eval runs data-free baselines only")
    names = find_targets(model, TargetConfig())
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            if not isinstance(layer, torch.nn.Linear):
                raise ValueError(f"baseline {spec!r}: layer {name} is a {type(layer).__name__}, not nn.Linear")
            q = method.quantize(layer.weight.detach().float(), None, 0)
            layer.weight.copy_(q.weight.to(layer.weight.dtype))
    return f"{row.label} ({method.source}) on {len(names)} layers"


def _cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(width=110)
    what: str
    if args.checkpoint:
        from lqmod.hf import load_local_tokenizer
        from lqmod.io import load_checkpoint, read_manifest
        from lqmod.model import set_adapters_enabled

        if args.baseline:
            raise ValueError("--baseline quantizes an unquantized --model; it does not apply to --checkpoint")
        base = args.base or read_manifest(args.checkpoint).get("extra", {}).get("source_model")
        if not base:
            raise ValueError("the checkpoint does not say which model it came from: pass --base for its tokenizer")
        model = load_checkpoint(args.checkpoint)
        tokenizer = load_local_tokenizer(base)
        set_adapters_enabled(model, not args.no_adapters)
        what = f"checkpoint {args.checkpoint}" + (" (adapters off)" if args.no_adapters else "")
    else:
        from lqmod.hf import load_local_model

        if args.no_adapters:
            raise ValueError("--no-adapters applies to --checkpoint only")
        model, tokenizer, where = load_local_model(args.model)
        if where.kind != "causal-lm":
            raise ValueError(f"{args.model} is not a causal LM: perplexity needs one")
        what = f"model {args.model}"
        if args.baseline:
            what += f" + baseline {_baseline(model, args.baseline)}"
    res = evaluate_text(
        model, tokenizer, args.text, context=args.context, stride=args.stride,
        max_tokens=args.max_tokens or None, batch_size=args.batch_size, progress=not args.no_progress,
    )
    res["evaluated"] = what
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    console.print(
        f"{what}: perplexity {res['ppl']:.3f} on {res['tokens']} tokens of {args.text} "
        f"(context {res['context']}, stride {res['stride']}, {res['seconds']:.1f} s)", highlight=False
    )
    return 0
