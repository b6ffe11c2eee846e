"""``lqmod quantize MODEL --stream``: from the command line's arguments to a streamed quantization."""

from __future__ import annotations

from typing import Any

from lqmod.model import LayerQuantizer, QuantizeReport
from lqmod.streaming.source import build_skeleton
from lqmod.streaming.streamed import quantize_pretrained_streamed


def stream_command(args: Any, *, quantizer: str | None, config: Any, lora: Any, targets: Any,
                   plan: Any) -> QuantizeReport:
    """``lqmod quantize MODEL --stream``: the streamed path, calibration batches included."""
    from lqmod.calibration.command import sink_from_args
    from lqmod.hf import load_local_tokenizer, resolve_model

    where = resolve_model(args.model)
    if where.gguf_file:
        raise ValueError(
            f"--stream reads safetensors files; {args.model} is the GGUF file {where.gguf_file}: convert it once "
            "(transformers from_pretrained(..., gguf_file=...).save_pretrained(DIR)) and quantize DIR"
        )
    skeleton = build_skeleton(where.path)
    lq = LayerQuantizer(skeleton, quantizer, config, lora=lora, targets=targets, plan=plan, registry=None, seed=0)
    needs = {s for name in lq.entries for s in lq.needs(name)}
    batches = None
    if needs or args.sequential:
        if needs - {"hessian"}:
            other = sorted(needs - {"hessian"})
            raise ValueError(
                f"--stream computes Hessians block by block; the chosen quantizer(s) also need {other}, which take "
                "the whole model: quantize without --stream"
            )
        if not args.sequential:
            raise ValueError("--stream calibrates block by block: add --sequential (with --calib-text and --n-calib)")
        if args.calib_text is None:
            raise ValueError("--sequential needs --calib-text (wikitext2, ptb or a UTF-8 file) and --n-calib N")
        from lqmod.calibration.text import calibration_batches

        tokenizer = load_local_tokenizer(str(where.path))
        batches = calibration_batches(tokenizer, where.kind if where.kind != "auto" else "causal-lm",
                                      args.calib_text, args.n_calib, length=args.calib_seq_len)
    del skeleton, lq
    return quantize_pretrained_streamed(
        where.path, quantizer, config, out=args.out, lora=lora, targets=targets, plan=plan, batches=batches,
        sink=sink_from_args(args, model_kind=where.kind if where.kind != "auto" else "causal-lm"),
        overwrite=args.overwrite, extra={"source_model": str(where.path)},
        progress=not getattr(args, "no_progress", False),
    )
