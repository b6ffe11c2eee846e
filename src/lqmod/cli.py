"""The ``lqmod`` command line: plugins, quantize, calibrate, finetune, eval, export, export-peft, plan, bench, demo."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lqmod.config import ConfigError
from lqmod.plugins import PluginClashError

__all__ = ["main", "parse_kv"]

console = Console(width=110)


def parse_kv(text: str | None) -> dict[str, Any]:
    """``"bits=4,blocksize=64,double_quant=false"`` -> dict with JSON-typed values."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        if "=" not in part:
            raise ConfigError(f"config item {part!r} is not key=value (example: bits=4,blocksize=64)")
        key, value = (s.strip() for s in part.split("=", 1))
        try:
            out[key] = json.loads(value.lower() if value.lower() in ("true", "false", "null") else value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _cmd_plugins(args: argparse.Namespace) -> int:
    from lqmod.plugins import get_registry

    reg = get_registry()
    table = Table(title="lqmod plug-ins")
    for col in ("kind", "name", "distribution", "description"):
        table.add_column(col)
    for row in reg.describe():
        table.add_row(row["kind"], row["name"], row["distribution"], row["description"])
    for entry in reg.disabled:  # "entry point (distribution)": never loaded, so its registrations are unknown
        name, _, dist = entry.partition(" (")
        table.add_row("[dim]disabled[/]", name, dist.removesuffix(")"), "not loaded: named in LQMOD_DISABLE_PLUGINS")
    console.print(table)
    for f in reg.failures:
        console.print(f"[red]failed to load[/] {f.entry_point} ({f.distribution}): {f.error}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from lqmod.calibration.command import quantize_with_calibration
    from lqmod.config import LoRAConfig, TargetConfig, validate_config
    from lqmod.hf import load_local_model
    from lqmod.io import save_checkpoint
    from lqmod.plugins import get_registry
    from lqmod.quantize import resolve_config

    # Everything that can be checked is checked before the (slow) model load and quantization:
    # the output target first, so no work is done only to be refused at the end.
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it, or choose another --out")
    if not args.plan:
        resolve_config(get_registry().quantizer(args.quantizer), parse_kv(args.config))
    plan = json.loads(Path(args.plan).read_text()) if args.plan else None
    if args.rank < 1:
        raise ConfigError(f"--rank {args.rank}: the LoRA rank must be a positive integer, e.g. --rank 8")
    if args.alpha is not None and not args.alpha > 0:  # also refuses nan
        raise ConfigError(
            f"--alpha {args.alpha:g}: alpha must be a positive number (the adapter update is scaled by "
            "alpha / rank, so 0 would switch it off); omit --alpha for the default 2 x rank"
        )
    alpha = 2.0 * args.rank if args.alpha is None else args.alpha
    lora = validate_config(
        LoRAConfig,
        {"r": args.rank, "alpha": alpha, "adapter": args.adapter, "adapter_config": parse_kv(args.adapter_config)},
        what="--rank/--alpha/--adapter",
    )
    adapter = get_registry().adapter(lora.adapter)
    validate_config(adapter.config_model, lora.adapter_config, what=f"--adapter-config for {adapter.name}")
    targets = validate_config(
        TargetConfig,
        {**({"include": tuple(args.include)} if args.include else {}),
         **({"exclude": tuple(args.exclude)} if args.exclude else {})},
        what="--include/--exclude",
    )
    if args.stream:
        from lqmod.streaming import stream_command

        report = stream_command(args, quantizer=args.quantizer, config=parse_kv(args.config),
                                lora=lora, targets=targets, plan=plan)
        console.print(f"quantized {len(report.layers)} layers ({report.n_params / 1e6:.2f}M params) at "
                      f"{report.bits_per_param:.3f} bits/param, streamed from the safetensors files; wrote {args.out}")
        return 0
    model, tokenizer, where = load_local_model(args.model)
    # Statistics are computed only when a chosen quantizer needs them (or --sequential asks).
    report = quantize_with_calibration(
        model, tokenizer, where.kind, args,
        quantizer=args.quantizer, config=parse_kv(args.config), lora=lora, targets=targets, plan=plan,
    )
    save_checkpoint(model, args.out, overwrite=args.overwrite, extra={"source_model": str(where.path)})
    console.print(
        f"quantized {len(report.layers)} layers ({report.n_params / 1e6:.2f}M params) at "
        f"{report.bits_per_param:.3f} bits/param; wrote {args.out}"
    )
    return 0


def _cmd_export_peft(args: argparse.Namespace) -> int:
    from lqmod.io import export_peft, load_checkpoint

    export_peft(load_checkpoint(args.checkpoint), args.out, overwrite=args.overwrite)
    console.print(f"wrote PEFT adapter to {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lqmod.hf import resolve_model

    if resolve_model(args.model).kind == "encoder":
        from lqmod.demo import run_demo

        run_demo(model_name=args.model, steps=args.steps or 60, console=console)
    else:
        from lqmod.demo_lm import run_lm_demo

        run_lm_demo(model_name=args.model, steps=args.steps or 12, console=console)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lqmod import __version__
    from lqmod.calibration.command import add_quantize_options
    from lqmod.calibration.command import register as register_calibrate
    from lqmod.evaluation.command import register as register_eval
    from lqmod.integrations.export_command import register as register_export
    from lqmod.train.command import register as register_finetune

    p = argparse.ArgumentParser(prog="lqmod", description=__doc__)
    p.add_argument("--version", action="version", version=f"lqmod {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("plugins", help="list registered quantizers, initializers, allocators, adapters").set_defaults(
        func=_cmd_plugins
    )

    q = sub.add_parser("quantize", help="quantize a local model and attach LoRA adapters")
    q.add_argument("model", help="minilm, smollm2, a local transformers directory or a .gguf file")
    q.add_argument("--quantizer", default="nf")
    q.add_argument("--config", default="", help="quantizer config as key=value pairs, e.g. bits=4,blocksize=64")
    q.add_argument("--plan", help="a plan JSON (module -> quantizer, config) instead of --quantizer")
    q.add_argument("--include", nargs="*", help="regexes of module names to quantize")
    q.add_argument("--exclude", nargs="*", help="regexes of module names to leave alone")
    q.add_argument("--rank", type=int, default=8)
    q.add_argument("--alpha", type=float, default=None)
    q.add_argument("--adapter", default="lora", help="adapter variant (lqmod plugins lists them: lora, dora, iec ...)")
    q.add_argument("--adapter-config", default="", help="the variant's options as key=value pairs, e.g. beta_init=0")
    q.add_argument("--out", required=True)
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--stream", action="store_true",
                   help="read the safetensors files one layer (--sequential: one block) at a time, never holding the "
                   "dense model; same checkpoint, byte for byte")
    add_quantize_options(q)
    q.set_defaults(func=_cmd_quantize)
    register_calibrate(sub)

    register_finetune(sub)
    register_eval(sub)

    register_export(sub)
    e = sub.add_parser("export-peft", help="write a checkpoint's adapters in PEFT's format")
    e.add_argument("checkpoint")
    e.add_argument("--out", required=True)
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=_cmd_export_peft)

    d = sub.add_parser("demo", help="quantize a real model, finetune LoRA, compare with full precision")
    d.add_argument("--model", default="smollm2",
                   help="smollm2 (causal LM: 3-bit NF, perplexity) or minilm (encoder: NF4, embedding fidelity)")
    d.add_argument("--steps", type=int, default=None, help="finetuning steps (default: 12 for smollm2, 60 for minilm)")
    d.set_defaults(func=_cmd_demo)

    try:
        from lqmod.bench.command import register
    except ImportError:
        pass
    else:
        register(sub)
    try:
        from lqmod.allocation.command import register as register_plan
    except ImportError:
        pass
    else:
        register_plan(sub)
    return p


def _one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        from lqmod.config import format_validation_error

        return format_validation_error(exc)
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    from lqmod._quiet import quiet_third_party

    args = build_parser().parse_args(argv)
    # Known third-party import noise is dropped, except where torchao is one of the things
    # measured (bench). build_parser imports neither transformers nor the Hub (tests/packaging).
    if args.command != "bench":
        quiet_third_party()
    try:
        return int(args.func(args))
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, KeyError, PluginClashError) as exc:
        # User errors get one clear line, not a traceback (nor pydantic's multi-line report).
        console.print(f"[red]error:[/] {_one_line(exc)}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
