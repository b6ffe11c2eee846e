"""The causal-LM demo: quantize real SmolLM2-135M to 3 bits, finetune LoRA with the packed
causal-LM loop on WikiText-2 validation text, and compare held-out perplexity (WikiText-2
raw test) with the full-precision model before and after.

Sized for a 2-core CPU: a few minutes end to end (see the README for the measured time).
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lqmod.config import LoRAConfig
from lqmod.evaluation.perplexity import stream_perplexity
from lqmod.hf import load_local_model
from lqmod.io import load_checkpoint, save_checkpoint
from lqmod.model import quantize_model, size_bytes
from lqmod.train import FinetuneConfig, pack_records, source_text, train_causal_lm

__all__ = ["LMDemoResult", "run_lm_demo"]


@dataclass
class LMDemoResult:
    rows: list[tuple[str, str]]
    ppl_fp: float
    ppl_before: float
    ppl_after: float
    reload_identical: bool


def run_lm_demo(
    *,
    model_name: str = "smollm2",
    quantizer: str = "nf",
    config: dict[str, Any] | None = None,
    steps: int = 12,
    batch_size: int = 4,
    seq_len: int = 128,
    lr: float = 2e-3,
    rank: int = 8,
    eval_tokens: int = 2048,
    context: int = 256,
    seed: int = 0,
    console: Console | None = None,
    progress: bool = True,
) -> LMDemoResult:
    console = console or Console()
    t_start = time.perf_counter()
    config = config if config is not None else {"bits": 3, "blocksize": 64, "double_quant": True}
    fp, tokenizer, where = load_local_model(model_name)
    if where.kind != "causal-lm":
        raise ValueError(f"the LM demo needs a causal LM, {model_name!r} is a {where.kind}")
    held_ids = torch.tensor(tokenizer(source_text("wikitext2"), add_special_tokens=False)["input_ids"][:eval_tokens])
    train = pack_records(tokenizer, "wikitext2-valid", seq_len)
    console.print(f"[bold]model[/] {where.name}; training on {len(train)} windows of {seq_len} tokens of "
                  f"WikiText-2 validation, held-out perplexity on {held_ids.numel()} tokens of WikiText-2 test")

    def ppl(model: torch.nn.Module) -> float:
        return stream_perplexity(model, held_ids, context=context, batch_size=4).ppl

    ppl_fp = ppl(fp)
    fp_bytes = size_bytes(fp)
    model = copy.deepcopy(fp)
    del fp
    t0 = time.perf_counter()
    report = quantize_model(model, quantizer, config, lora=LoRAConfig(r=rank, alpha=2 * rank), seed=seed,
                            progress=progress)
    q_seconds = time.perf_counter() - t0
    ppl_before = ppl(model)
    # No warmup: transformers' warmup starts at lr 0, which would waste a step of a dozen.
    cfg = FinetuneConfig(steps=steps, micro_batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=0, seed=seed)
    result = train_causal_lm(model, train, cfg, progress=progress)
    ppl_after = ppl(model)

    probe = held_ids[:64].unsqueeze(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, f"{tmp}/ckpt")
        reloaded = load_checkpoint(f"{tmp}/ckpt")
        with torch.no_grad():
            identical = bool(torch.equal(model(input_ids=probe).logits, reloaded(input_ids=probe).logits))

    mb = 1024 * 1024
    n_train_tokens = steps * cfg.tokens_per_step
    rows = [
        ("quantizer", f"{quantizer} {config}"),
        ("quantized layers", f"{len(report.layers)} ({report.n_params / 1e6:.1f}M params)"),
        ("bits/param of quantized layers (with scales)", f"{report.bits_per_param:.3f}"),
        ("model size fp32 -> quantized+LoRA", f"{fp_bytes / mb:.1f} MiB -> {size_bytes(model) / mb:.1f} MiB"),
        ("quantize time", f"{q_seconds:.1f} s"),
        (f"held-out perplexity, fp32 model (context {context})", f"{ppl_fp:.2f}"),
        ("held-out perplexity, quantized, before finetune", f"{ppl_before:.2f}"),
        ("held-out perplexity, quantized, after finetune", f"{ppl_after:.2f}"),
        ("finetune", f"{steps} steps x {batch_size}x{seq_len} tokens ({n_train_tokens} tokens), LoRA rank {rank}"),
        ("training loss first -> last", f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f}"),
        ("training throughput", f"{result.tokens_per_s:.0f} tokens/s"),
        ("checkpoint reload gives identical logits", str(identical)),
        ("total time", f"{time.perf_counter() - t_start:.0f} s"),
    ]
    table = Table(title=f"lqmod demo: {config.get('bits', '?')}-bit {quantizer} + LoRA on {where.name} (real weights, "
                  "WikiText-2)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    return LMDemoResult(rows, ppl_fp, ppl_before, ppl_after, identical)
