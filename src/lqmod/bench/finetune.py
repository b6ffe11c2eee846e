"""The finetuning benchmark: LoRA on a quantized model, lqmod vs bitsandbytes + PEFT QLoRA.

Same model, same NF4 base (bit-exact between the two without double quantization), same
LoRA rank/alpha, same initial adapters (PEFT's A is overwritten with lqmod's), same data
order and optimizer, fixed number of steps. Objectives on real text:

* encoder: distil the fp32 model's sentence embeddings, loss ``1 - cos`` on WikiText-2
  training sentences; fidelity = mean cosine to fp32 on the held-out sentences;
* causal LM: next-token cross-entropy on WikiText-2 windows; fidelity = held-out perplexity.

Memory on CPU is measured two ways (see :mod:`lqmod.bench.memory`): bytes saved for
backward (deterministic) and peak RSS growth during the steps (noisy, allocator dependent).
"""

from __future__ import annotations

import copy
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from lqmod.bench import calib, fidelity
from lqmod.bench.memory import SavedTensorMeter, resident_bytes, rss_peak_meter
from lqmod.bench.metrics import cosine_rows
from lqmod.bench.run import BenchSettings, Workload, finetune_batch

__all__ = ["FINETUNE_RUNS", "run_finetune"]

NF4 = {"bits": 4, "blocksize": 64, "double_quant": False}
# (method, base quantizer config, extra LoRA settings); the bnb run needs a 4-bit NF base.
FINETUNE_RUNS: dict[str, list[tuple[str, dict[str, Any], dict[str, Any]]]] = {
    "encoder": [
        ("lqmod", NF4, {}),
        ("bnb+peft", NF4, {}),
        ("lqmod (dense W saved)", NF4, {"materialize_in_backward": False}),
        ("lqmod", {**NF4, "bits": 3}, {}),
    ],
    # The dense-W comparison is the encoder's job: a causal-LM step costs ~10x more on CPU.
    "causal-lm": [
        ("lqmod", NF4, {}),
        ("bnb+peft", NF4, {}),
    ],
}
LORA: dict[str, Any] = {"r": 8, "alpha": 16.0}
LR = {"encoder": 1e-3, "causal-lm": 2e-4}


def _family(kind: str) -> str:
    return "causal-lm" if kind == "causal-lm" else "encoder"


def _base_label(cfg: dict[str, Any]) -> str:
    return f"NF{cfg['bits']} b{cfg['blocksize']}" + (" dq" if cfg["double_quant"] else "")


def _lqmod_model(w: Workload, cfg: dict[str, Any], extra: dict[str, Any], seed: int) -> nn.Module:
    from lqmod.model import quantize_model

    model = copy.deepcopy(w.model)
    targets = {"include": tuple(f"^{re.escape(n)}$" for n in w.targets), "exclude": ()}
    quantize_model(model, "nf", cfg, lora={**LORA, **extra}, targets=targets, seed=seed, progress=False)
    return model


@contextmanager
def peft_gptqmodel_check_bypassed(notes: list[str]) -> Iterator[None]:
    """PEFT 0.21 raises ImportError while injecting LoRA into *any* model when gptqmodel is
    importable but optimum is not (gptqmodel 7.6 does not pull it in). These models hold no
    GPTQ layers, so the check is moot: answer "no gptqmodel" for the duration, and say so."""
    from peft import import_utils

    original = import_utils.is_gptqmodel_available
    try:
        original()
        yield
        return
    except ImportError as exc:
        notes.append(f"PEFT's gptqmodel check bypassed (no GPTQ layers here): {exc}")
    patched = [
        m
        for n, m in list(sys.modules.items())
        if n.startswith("peft") and getattr(m, "is_gptqmodel_available", None) is original
    ]
    for m in patched:
        m.is_gptqmodel_available = lambda: False  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for m in patched:
            m.is_gptqmodel_available = original  # type: ignore[attr-defined]


def bnb_peft_model(
    source: nn.Module,
    targets: Sequence[str],
    cfg: Mapping[str, Any],
    *,
    r: int,
    alpha: float,
    init_a: Mapping[str, torch.Tensor] | None = None,
    notes: list[str],
) -> nn.Module:
    """A copy of ``source`` with ``targets`` as bitsandbytes NF4 ``Linear4bit`` (``cfg``: blocksize,
    double_quant) under PEFT LoRA of rank ``r``; ``init_a`` replaces PEFT's initial ``lora_A``."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from lqmod.model import replace_module

    model = copy.deepcopy(source)
    for name in targets:
        old: Any = model.get_submodule(name)
        new = bnb.nn.Linear4bit(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            compute_dtype=torch.float32,
            compress_statistics=cfg["double_quant"],
            quant_type="nf4",
        )
        new.weight = bnb.nn.Params4bit(
            old.weight.data.clone(),
            requires_grad=False,
            quant_type="nf4",
            blocksize=cfg["blocksize"],
            compress_statistics=cfg["double_quant"],
        )
        new = new.to(old.weight.device)  # Params4bit quantizes on its first .to()
        # bnb repacks CPU weights for its AVX512-BF16 inference kernel on the first eval-mode
        # forward and keeps that layout, which then breaks training (and computes in bf16);
        # keep the plain NF4 layout so eval and training use the same fp32 kernel.
        new.support_avx512bf16_for_cpu = False
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data.clone(), requires_grad=False)
        replace_module(model, name, new)
    # PEFT types lora_alpha as int; the scale alpha / r is the same for a float.
    peft_cfg = LoraConfig(r=r, lora_alpha=cast(int, alpha), target_modules=list(targets), lora_dropout=0.0)
    with peft_gptqmodel_check_bypassed(notes):
        peft_model: Any = get_peft_model(model, peft_cfg)
    # Start from lqmod's adapters (both use B = 0), so the two runs differ only in kernels.
    for name, a in (init_a or {}).items():
        layer: Any = peft_model.base_model.model.get_submodule(name)
        layer.lora_A["default"].weight.data.copy_(a)
    return peft_model


def _objective(w: Workload, s: BenchSettings) -> tuple[Any, Any, str, str]:
    """(batches, loss(model, batch), objective text, loss name) on the training split."""
    bs = finetune_batch(w.kind, s)
    if w.kind == "causal-lm":
        assert isinstance(w.splits, calib.TokenSplits)
        windows = w.splits.train
        batches = [{"input_ids": windows[i : i + bs]} for i in range(0, s.finetune_steps * bs, bs)]

        def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

        return batches, lm_loss, f"causal-LM cross-entropy on WikiText-2 windows ({bs}x{s.ctx} tokens/step)", "NLL"
    assert isinstance(w.splits, calib.SentenceSplits)
    batches = fidelity.encode_batches(w.tokenizer, w.splits.train, batch_size=bs)[: s.finetune_steps]
    with torch.inference_mode():
        teachers = [fidelity.sentence_embeddings(w.model, [b]) for b in batches]
    for b, t in zip(batches, teachers, strict=True):
        b["teacher"] = t.clone()

    def distil_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "teacher"}
        emb = fidelity.mean_pool(model(**inputs).last_hidden_state, inputs["attention_mask"])
        return (1 - cosine_rows(emb, batch["teacher"])).mean().float()

    return batches, distil_loss, f"distil fp32 sentence embeddings, 1 - cos, {bs} WikiText-2 sentences/step", "1 - cos"


def _fidelity(w: Workload, model: nn.Module) -> float:
    model.eval()
    if w.kind == "causal-lm":
        assert isinstance(w.splits, calib.TokenSplits)
        return fidelity.perplexity(model, w.splits.eval)
    with torch.inference_mode():
        emb = fidelity.sentence_embeddings(model, w.eval_batches)
    return float(cosine_rows(emb, w.reference["embeddings"]).mean())


def _train(model: nn.Module, batches: list[Any], loss_fn: Any, lr: float, label: str, progress: bool) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    meter = SavedTensorMeter(model)
    losses = []
    # Eval mode: the base model's dropout off, so both methods see the same deterministic
    # function and their loss curves can be compared step by step (LoRA dropout is 0).
    model.eval()
    rss_deltas: list[int] = []
    seconds = 0.0
    for batch in tqdm(batches, desc=f"finetune {label}", unit="step", disable=not progress, leave=False):
        # RSS peak per step (reset before each): the allocator's drift between steps and
        # between runs stays out of the number.
        with rss_peak_meter() as rss:
            t0 = time.perf_counter()
            with meter.step():
                loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if rss["delta"] is not None:
            rss_deltas.append(rss["delta"])
    return {
        "loss": losses,
        "trainable_params": sum(p.numel() for p in params),
        "saved_for_backward_bytes": meter.peak_bytes,
        "peak_rss_delta_bytes": max(rss_deltas) if rss_deltas else None,
        "seconds_per_step": seconds / max(len(batches), 1),
    }


def run_finetune(w: Workload, s: BenchSettings) -> dict[str, Any]:
    batches, loss_fn, objective, loss_name = _objective(w, s)
    runs_spec = FINETUNE_RUNS[_family(w.kind)]
    if s.quick:
        runs_spec = runs_spec[:2]
    runs: list[dict[str, Any]] = []
    init_a: dict[str, torch.Tensor] = {}
    for method, cfg, extra in runs_spec:
        run: dict[str, Any] = {
            "method": method,
            "base": _base_label(cfg),
            "steps": len(batches),
            "lora": {**LORA, **extra},
            "notes": [],
        }
        try:
            torch.manual_seed(s.seed)
            if method.startswith("lqmod"):
                model = _lqmod_model(w, cfg, extra, s.seed)
                if not init_a and cfg == NF4:
                    init_a = {n: cast(Any, model.get_submodule(n)).lora_A.detach().clone() for n in w.targets}
            else:
                model = bnb_peft_model(w.model, w.targets, cfg, r=LORA["r"], alpha=LORA["alpha"], init_a=init_a,
                                       notes=run["notes"])
        except ImportError as exc:
            runs.append({**run, "status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"})
            continue
        run["resident_bytes"] = resident_bytes(model)
        run["fidelity_before"] = _fidelity(w, model)
        run.update(_train(model, batches, loss_fn, LR[_family(w.kind)], method, s.progress))
        run["fidelity_after"] = _fidelity(w, model)
        run["status"] = "ok"
        runs.append(run)
        del model
    return {
        "objective": objective,
        "loss_name": loss_name,
        "fidelity_metric": "perplexity" if w.kind == "causal-lm" else "cosine",
        "reference_fidelity": float(w.reference["value"]),
        "memory_note": "saved for backward = peak bytes of distinct tensors autograd saved in one step, model "
        "parameters/buffers excluded (torch.autograd.graph.saved_tensors_hooks); peak RSS Δ = VmHWM growth "
        "during the steps after a reset (Linux), allocator dependent",
        "lr": LR[_family(w.kind)],
        "batch": finetune_batch(w.kind, s),
        "runs": runs,
    }
