"""``lqmod export``: a finetuned model as a serving engine's quantized base plus a PEFT adapter.

``lqmod export SOURCE --format gptq+peft --out DIR`` where SOURCE is an lqmod checkpoint
(``lqmod quantize`` / ``lqmod finetune`` output) or a transformers directory saved from a
model loaded with ``LqmodConfig`` (its PEFT adapter given with ``--adapter``). The formats
are ``<base>+peft`` for every registered serving base format (``gptq``, from the OPTQ
plug-in). ``lqmod export-peft`` still writes the adapter alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    e = subparsers.add_parser(
        "export",
        help="write a finetuned model as a quantized base for serving engines plus its PEFT adapter",
        description="Write SOURCE's quantized base in a serving format (gptq: a GPTQ checkpoint that GPTQModel, "
        "vLLM and TGI load) and its LoRA adapter in PEFT's format, under --out/base and --out/adapter.",
    )
    e.add_argument("source", help="an lqmod checkpoint, or a transformers directory saved with LqmodConfig")
    e.add_argument("--format", default="gptq+peft", help="<base format>+peft (default gptq+peft)")
    e.add_argument("--out", required=True)
    e.add_argument("--adapter", default=None, help="with a transformers SOURCE: its PEFT adapter directory")
    e.add_argument(
        "--tokenizer",
        default=None,
        help="the tokenizer to save with the base (a model name lqmod knows, or a directory); default: the "
        "model the checkpoint came from, or SOURCE itself",
    )
    e.add_argument(
        "--checkpoint-format", default=None, choices=("gptq", "gptq_v2"), help="gptq: GPTQ zero-point convention"
    )
    e.add_argument(
        "--no-fold-scaling",
        action="store_true",
        help="keep lora_B and lora_alpha as trained (default: alpha / r folded into lora_B, lora_alpha = r, "
        "which loaders that ignore lora_alpha, such as GPTQModel's adapter=, need)",
    )
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=_cmd_export)


def _base_format(text: str) -> str:
    from lqmod.integrations.formats import base_formats

    formats = sorted(base_formats())
    base, plus, adapter = text.partition("+")
    if plus != "+" or adapter != "peft" or base not in formats:
        choices = ", ".join(f"{f}+peft" for f in formats) or "(none: no plug-in registered a serving format)"
        raise ValueError(f"--format {text!r} is not one of: {choices}")
    return base


def _is_lqmod_checkpoint(path: Path) -> bool:
    from lqmod.io import MANIFEST

    return (path / MANIFEST).is_file()


def _is_lqmod_transformers_dir(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "lqmod"


def _tokenizer(name: str | None) -> Any:
    if name is None:
        return None
    from lqmod.hf import load_local_tokenizer

    return load_local_tokenizer(name)


def _load(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The model to export and where its tokenizer comes from."""
    source = Path(args.source)
    if _is_lqmod_checkpoint(source):
        from lqmod.io import load_checkpoint, read_manifest

        if args.adapter is not None:
            raise ValueError("--adapter applies to a transformers SOURCE; an lqmod checkpoint holds its adapters")
        tokenizer = args.tokenizer or read_manifest(source).get("extra", {}).get("source_model")
        return load_checkpoint(source), tokenizer
    if _is_lqmod_transformers_dir(source):
        import lqmod.integrations

        lqmod.integrations.register()
        from transformers import AutoModelForCausalLM

        model: Any = AutoModelForCausalLM.from_pretrained(source)
        if args.adapter is None:
            raise ValueError(f"{source} is a quantized base without adapters: pass its PEFT adapter with --adapter DIR")
        import peft

        model = peft.PeftModel.from_pretrained(model, args.adapter)
        has_tokenizer = any((source / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        return model, args.tokenizer or (str(source) if has_tokenizer else None)
    raise FileNotFoundError(
        f"{source} is neither an lqmod checkpoint (lqmod.json) nor a transformers directory saved with "
        "LqmodConfig (config.json with quantization_config.quant_method 'lqmod')"
    )


def _cmd_export(args: argparse.Namespace) -> int:
    from lqmod.cli import console
    from lqmod.integrations.serving import export_for_serving

    base_format = _base_format(args.format)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it, or choose another --out")
    model, tokenizer_name = _load(args)
    options = {"checkpoint_format": args.checkpoint_format} if args.checkpoint_format else {}
    result = export_for_serving(
        model,
        out,
        base_format=base_format,
        tokenizer=_tokenizer(tokenizer_name),
        overwrite=args.overwrite,
        fold_scaling=not args.no_fold_scaling,
        options=options,
    )
    if tokenizer_name is None:
        console.print("[yellow]no tokenizer saved[/] (GPTQModel and the engines need one in base/): pass --tokenizer")
    console.print(
        f"wrote {result.n_layers} {'/'.join(result.quantizers)} layers as {result.base_format} to {result.base} "
        f"and the LoRA adapter to {result.adapter}"
    )
    return 0
