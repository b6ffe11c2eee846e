"""``lqmod finetune``: train a checkpoint's adapters (causal LMs with the packed-data loop,
encoders by embedding distillation) and write the finetuned checkpoint.

``torchrun --nproc-per-node N -m lqmod finetune ...`` (or ``accelerate launch -m lqmod
finetune ...``) trains a causal LM data-parallel: the same global batch, split over the N
processes; rank 0 alone writes the run directory and the checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "register", "run_dir_for"]


def register(subparsers: argparse._SubParsersAction) -> None:
    f = subparsers.add_parser(
        "finetune",
        help="train a checkpoint's adapters (causal LM: packed next-token loss; encoder: distillation)",
        description="Train the adapters of an lqmod checkpoint. Causal LMs train on packed token windows of "
        "--train (a corpus name, a text file, or JSONL with 'text' or 'prompt'/'completion' records), with "
        "warmup + decay, accumulation, clipping, periodic held-out evaluation on --eval and resumable state in "
        "the run directory (metrics.jsonl, loss_curve.png, states/). Under torchrun --nproc-per-node N (or "
        "accelerate launch) it trains data-parallel with the same global batch (--batch-size x --grad-accum "
        "windows, split over the processes).",
    )
    f.add_argument("checkpoint", help="an lqmod checkpoint directory (from lqmod quantize)")
    add_arguments(f)
    f.set_defaults(func=_cmd_finetune)


def add_arguments(f: argparse.ArgumentParser) -> None:
    f.add_argument("--base", default=None, help="the unquantized model (tokenizer; teacher for encoders); "
                   "default: the model the checkpoint was quantized from")
    f.add_argument("--train", "--text", dest="train", default="wikitext2-valid",
                   help="training text: wikitext2-valid | ptb-valid | wikitext2 | ptb | a file (.txt or .jsonl)")
    f.add_argument("--eval", dest="eval_text", default="wikitext2",
                   help="held-out text for the evaluations (same forms as --train; 'none' to skip)")
    f.add_argument("--eval-windows", type=int, default=16, help="held-out windows of --seq-len tokens")
    f.add_argument("--steps", type=int, default=40)
    f.add_argument("--batch-size", type=int, default=8, help="windows per micro-batch")
    f.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    f.add_argument("--seq-len", type=int, default=128, help="tokens per packed window")
    f.add_argument("--max-length", type=int, default=64, help="encoders: tokens per sentence")
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine")
    f.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)")
    f.add_argument("--weight-decay", type=float, default=0.0)
    f.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    f.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    f.add_argument("--gradient-checkpointing", action="store_true")
    f.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: before and after only)")
    f.add_argument("--save-every", type=int, default=0, help="save resumable state every N steps (0: at the end)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--adapter", default=None, help="train the checkpoint's LoRA adapters as this variant "
                   "(e.g. dora, iec; lqmod plugins lists them); default: the variant the checkpoint holds")
    f.add_argument("--adapter-config", default="", help="that variant's options as key=value pairs")
    f.add_argument("--dist-timeout", type=float, default=600.0,
                   help="data-parallel runs: seconds a collective waits for a stalled process before the run fails")
    f.add_argument("--run-dir", default=None, help="metrics, plot and resumable states (default: OUT.run)")
    f.add_argument("--resume", action="store_true", help="continue the interrupted run in --run-dir")
    f.add_argument("--out", required=True, help="the finetuned checkpoint directory")
    f.add_argument("--overwrite", action="store_true")
    f.add_argument("--no-progress", action="store_true")


def run_dir_for(out: str | Path, run_dir: str | Path | None) -> Path:
    out = Path(out)
    return Path(run_dir) if run_dir else out.with_name(out.name + ".run")


def _config(args: argparse.Namespace) -> Any:
    from lqmod.config import validate_config
    from lqmod.train.config import FinetuneConfig

    return validate_config(
        FinetuneConfig,
        {
            "steps": args.steps, "micro_batch_size": args.batch_size, "grad_accum": args.grad_accum,
            "seq_len": args.seq_len, "lr": args.lr, "schedule": args.schedule, "warmup_steps": args.warmup,
            "weight_decay": args.weight_decay, "grad_clip": args.grad_clip or None, "precision": args.precision,
            "gradient_checkpointing": args.gradient_checkpointing, "eval_every": args.eval_every,
            "save_every": args.save_every, "seed": args.seed, "dist_timeout_s": args.dist_timeout,
        },
        what="finetune options",
    )


def _convert_adapters(model: Any, args: argparse.Namespace) -> None:
    if args.adapter:
        from lqmod.cli import parse_kv
        from lqmod.model import convert_adapters

        convert_adapters(model, args.adapter, parse_kv(args.adapter_config))


def _cmd_finetune(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lqmod.hf import resolve_model
    from lqmod.io import read_manifest

    console = Console(width=110)
    out = Path(args.out)
    # Refused before any work: a run of many minutes must not end in "exists".
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    cfg = _config(args)
    if args.adapter:  # an unknown variant is refused before any data or model is loaded
        from lqmod.plugins import get_registry

        get_registry().adapter(args.adapter)
    manifest = read_manifest(args.checkpoint)
    base = args.base or manifest.get("extra", {}).get("source_model")
    if not base:
        raise ValueError("the checkpoint does not say which model it came from: pass --base")
    where = resolve_model(base)
    if where.kind == "encoder":
        return _finetune_encoder(args, base, console)
    run = run_dir_for(out, args.run_dir)
    if run.exists() and not (args.resume or args.overwrite):
        raise FileExistsError(f"run directory {run} exists; pass --resume to continue it or --overwrite to restart")
    if args.eval_text == args.train:
        raise ValueError(f"--eval {args.eval_text!r} is the training text: evaluate on held-out text")
    from lqmod.train.distributed import init_distributed

    # Every process checked the same files above, so they all fail or all go on.
    ctx = init_distributed(cfg.dist_timeout_s)
    try:
        return _finetune_causal_lm(args, cfg, manifest, base, out, run, ctx, console)
    finally:
        ctx.close()


def _finetune_causal_lm(
    args: argparse.Namespace, cfg: Any, manifest: dict[str, Any], base: str, out: Path, run: Path, ctx: Any,
    console: Any,
) -> int:
    from lqmod.hf import load_local_tokenizer
    from lqmod.io import load_checkpoint, save_checkpoint
    from lqmod.train.loop import train_causal_lm

    if ctx.is_main and args.overwrite and not args.resume and run.exists():
        import shutil

        shutil.rmtree(run)
    ctx.barrier(what="waiting for rank 0 to clear the run directory")
    tokenizer = load_local_tokenizer(base)
    train, held_out = _data(tokenizer, args, cfg.seq_len)
    model = load_checkpoint(args.checkpoint, device=ctx.device() if ctx.distributed else "cpu")
    _convert_adapters(model, args)
    result = train_causal_lm(
        model, train, cfg, eval_data=held_out, run_dir=run, resume=args.resume, progress=not args.no_progress,
        dist_ctx=ctx,
    )
    if not ctx.is_main:
        ctx.barrier(what="waiting for rank 0 to write the checkpoint")
        return 0
    extra = {**manifest.get("extra", {}), "finetune": {"config": json.loads(cfg.model_dump_json()),
                                                         "train": train.describe(), "evals": result.evals}}
    if ctx.distributed:
        extra["finetune"]["world_size"] = ctx.world_size
    save_checkpoint(model, out, overwrite=True, extra=extra)
    ctx.barrier(what="the end of the run")
    before, after = result.eval_before, result.eval_after
    if before and after:
        console.print(f"held-out perplexity {before['eval_ppl']:.2f} -> {after['eval_ppl']:.2f} "
                      f"({after['eval_tokens']} tokens of {args.eval_text})")
    console.print(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} over {len(result.losses)} steps, "
                  f"{result.tokens_per_s:.0f} tokens/s"
                  f"{f' over {ctx.world_size} processes' if ctx.distributed else ''}; wrote {out} (run: {run})")
    return 0


def _data(tokenizer: Any, args: argparse.Namespace, seq_len: int) -> tuple[Any, Any]:
    from lqmod.train.data import pack_records

    train = pack_records(tokenizer, args.train, seq_len)
    if args.eval_text in (None, "", "none"):
        return train, None
    if args.eval_windows < 1:
        raise ValueError(f"--eval-windows must be >= 1, got {args.eval_windows}")
    return train, pack_records(tokenizer, args.eval_text, seq_len, max_windows=args.eval_windows)


def _finetune_encoder(args: argparse.Namespace, base: str, console: Any) -> int:
    from lqmod.hf import load_local_model
    from lqmod.io import load_checkpoint, save_checkpoint
    from lqmod.train.data import source_text
    from lqmod.train.distill import TrainConfig, distill_loss, finetune

    texts = [ln.strip() for ln in source_text(args.train).splitlines() if len(ln.split()) >= 4]
    cfg = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length)
    model = load_checkpoint(args.checkpoint)
    _convert_adapters(model, args)
    teacher, tokenizer, _ = load_local_model(base)
    result = finetune(model, tokenizer, texts, lambda b: distill_loss(model, teacher, b), cfg,
                      progress=not args.no_progress)
    save_checkpoint(model, args.out, overwrite=args.overwrite)
    console.print(f"loss {result.first:.4f} -> {result.last:.4f} over {len(result.losses)} steps; wrote {args.out}")
    return 0
