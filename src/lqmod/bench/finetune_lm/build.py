"""Building one row's trainable model: quantized (from a cached plan or checkpoint), or a baseline."""

from __future__ import annotations

import copy
import inspect
import json
import math
import time
from typing import Any, cast

import torch
from torch import nn

from lqmod.bench.finetune_lm.context import _Context
from lqmod.bench.finetune_lm.fingerprints import _plan_error, _quant_key, lq_iters
from lqmod.bench.finetune_lm.rows import LMRow
from lqmod.bench.finetune_lm.settings import LMBenchSettings
from lqmod.bench.finetune_lm.store import _atomic_write, _dump, _read_json


def _lora(row: LMRow, s: LMBenchSettings) -> dict[str, Any]:
    lora: dict[str, Any] = {"r": s.rank, "alpha": s.alpha, "initializer": row.initializer}
    if row.initializer == "lq-lora":
        lora["initializer_config"] = {"max_iters": lq_iters(row, s)}
    return lora


def _config(row: LMRow, s: LMBenchSettings) -> dict[str, Any]:
    cfg = dict(row.config)
    if row.quantizer == "optq":
        cfg.setdefault("group_size", s.optq_group)
    return cfg


def _plan_options(s: LMBenchSettings) -> list[Any]:
    """What the plans choose from: NF 2/3/4 (blocks 64 and 128, double quant) and OPTQ 2/3
    (groups of ``optq_group``, symmetric and asymmetric, calibrated on the fp model's Hessians).

    No ``lq`` options: the low-rank part is the ``lq-lora`` initializer's job. No QuIP#-like
    options: quantizing one 576 x 576 matrix takes it ~10-70 s on the 2-core CPU, so its three
    options would add hours to the table (the quip rows measure it on its own).
    """
    from lqmod.config import validate_config
    from lqmod.plugins import get_registry
    from lqmod.types import Option

    reg = get_registry()
    raw: list[tuple[str, dict[str, Any]]] = [
        ("nf", {"bits": b, "blocksize": bs, "double_quant": True}) for b in (2, 3, 4) for bs in (64, 128)
    ]
    raw += [("optq", {"bits": b, "group_size": s.optq_group, "sym": sym}) for b in (2, 3) for sym in (True, False)]
    return [Option(q, validate_config(reg.quantizer(q).config_model, c, what=f"{q} plan option")) for q, c in raw]


def _plan(row: LMRow, ctx: _Context) -> tuple[Any, dict[str, Any]]:
    """The row's plan, cached as JSON (the error table under it is cached per option too)."""
    from lqmod.allocation import TableCache, allocate_table, build_model_error_table
    from lqmod.config import Plan

    path = ctx.cache / "plans" / f"{row.name}-{_quant_key(row, ctx.s)[:16]}.json"
    if (data := _read_json(path)) is not None:
        plan = Plan.model_validate(data["plan"])
        return plan, data["info"]
    kwargs: dict[str, Any] = {}
    measure = "frobenius"
    # The output-error measure is new; where this lqmod lacks it the plan says what it used.
    if "error" in inspect.signature(build_model_error_table).parameters:
        kwargs["error"] = measure = _plan_error(row, ctx.s)
    stats = ctx.hessians_and_fishers() if measure == "kfac" else ctx.hessians()
    table = build_model_error_table(
        ctx.model, options=_plan_options(ctx.s), stats=stats, cache=TableCache(ctx.cache / "tables"),
        progress=ctx.progress, **kwargs,
    )  # fmt: skip
    assert row.budget is not None
    plan, summary = allocate_table(table, row.budget, allocator="ilp")
    info = {
        "error_measure": measure,
        "budget_bits_per_param": row.budget,
        "achieved_bits_per_param": summary["achieved"]["bits_per_param"],
        "by_quantizer": summary["by_quantizer"],
        "by_option": summary["by_option"],
        "total_error": summary["total_error"],
        "solver_status": summary["status"],
    }
    _atomic_write(path, _dump({"plan": json.loads(plan.model_dump_json()), "info": info}))
    return plan, info


def _quantized(row: LMRow, ctx: _Context, notes: list[str]) -> tuple[nn.Module, dict[str, Any]]:
    """The quantized model with its initial adapters: from the checkpoint cache, or built and cached."""
    from lqmod.calibration import StatsCache, quantize_model_sequential
    from lqmod.io import load_checkpoint, read_manifest, save_checkpoint
    from lqmod.model import quantize_model

    s = ctx.s
    ckpt = ctx.cache / "checkpoints" / f"{row.name}-{_quant_key(row, s)[:16]}"
    if (ckpt / "lqmod.json").is_file():
        t0 = time.perf_counter()
        model = load_checkpoint(ckpt)
        built = dict(read_manifest(ckpt).get("extra", {}).get("finetune_lm", {}))
        built.update(cached=True, load_seconds=time.perf_counter() - t0)
        return model, built
    model = copy.deepcopy(ctx.model)
    lora = _lora(row, s)
    info: dict[str, Any] = {"cached": False}
    t0 = time.perf_counter()
    if row.kind == "plan":
        plan, info["plan"] = _plan(row, ctx)
        t1 = time.perf_counter()
        quantize_model(model, plan=plan, stats=ctx.hessians(), lora=lora, seed=s.seed, progress=ctx.progress)
        info["plan_seconds"] = t1 - t0
    elif row.calibration == "sequential":
        quantize_model_sequential(
            model, row.quantizer, _config(row, s), batches=ctx.calib(), lora=lora, seed=s.seed,
            cache=StatsCache(ctx.cache / "stats"), progress=ctx.progress, sink=ctx.sink(),
        )  # fmt: skip
    else:
        stats = ctx.hessians() if row.calibration == "hessian" else None
        quantize_model(model, row.quantizer, _config(row, s), lora=lora, stats=stats, seed=s.seed,
                       progress=ctx.progress)
    info["quantize_seconds"] = time.perf_counter() - t0
    save_checkpoint(model, ckpt, overwrite=True, extra={"source_model": s.model, "finetune_lm": info})
    return model, info


def _peft_lora_config(s: LMBenchSettings, targets: list[str]) -> Any:
    from peft import LoraConfig

    # PEFT types lora_alpha as int; the scale alpha / r is the same for a float.
    return LoraConfig(r=s.rank, lora_alpha=cast(int, s.alpha), target_modules=targets, lora_dropout=0.0)


def _fp_lora(ctx: _Context, notes: list[str]) -> nn.Module:
    from peft import get_peft_model

    from lqmod.bench.finetune import peft_gptqmodel_check_bypassed

    model = copy.deepcopy(ctx.model)
    torch.manual_seed(ctx.s.seed)  # PEFT draws A (Kaiming-uniform) from the global generator
    with peft_gptqmodel_check_bypassed(notes):
        return cast(nn.Module, get_peft_model(model, _peft_lora_config(ctx.s, ctx.targets())))


def _bnb(row: LMRow, ctx: _Context, notes: list[str]) -> nn.Module:
    from lqmod.bench.finetune import bnb_peft_model

    torch.manual_seed(ctx.s.seed)
    return bnb_peft_model(ctx.model, ctx.targets(), dict(row.config), r=ctx.s.rank, alpha=ctx.s.alpha, notes=notes)


def storage_bits(model: nn.Module) -> tuple[float, int]:
    """(bits per parameter, parameters) over the adapted/quantized linear weights, metadata included.

    lqmod layers: each ``QuantizedWeight.bits_per_param``; bitsandbytes ``Linear4bit``: the packed
    codes plus absmax (8-bit codes + their float32 scales + offset when double-quantized); dense
    layers under PEFT LoRA: the weight's dtype. Adapters are not counted (they are the same rank
    everywhere).
    """
    from lqmod.model import iter_lora_layers

    bits, params = 0.0, 0
    for _, m in iter_lora_layers(model):
        n = m.in_features * m.out_features
        bits += m.qweight.bits_per_param() * n
        params += n
    if params:
        return bits / params, params
    for mod in model.modules():
        base = getattr(mod, "base_layer", None)
        if base is None or not hasattr(base, "weight"):
            continue
        w = base.weight
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            n = int(math.prod(qs.shape))
            b = w.numel() * w.element_size() * 8 + qs.absmax.numel() * qs.absmax.element_size() * 8
            if getattr(qs, "nested", False) and qs.state2 is not None:
                b += qs.state2.absmax.numel() * qs.state2.absmax.element_size() * 8 + 32  # + the offset
            bits += b
        else:
            n = w.numel()
            bits += n * w.element_size() * 8
        params += n
    return (bits / params if params else math.nan), params
