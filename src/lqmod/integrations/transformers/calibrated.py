"""Quantization with calibration statistics: batches from the config's text, then Hessians or a Fisher."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lqmod.config import PlanEntry
from lqmod.integrations.base import quantize_linears
from lqmod.integrations.transformers.config import LqmodConfig
from lqmod.model import QuantizeReport
from lqmod.plugins import get_registry
from lqmod.types import LayerStats


def _model_kind(model: Any) -> str:
    get_out = getattr(model, "get_output_embeddings", None)
    return "causal-lm" if callable(get_out) and get_out() is not None else "encoder"


def _calibration_batches(model: Any, cal: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    from lqmod.calibration.text import calibration_batches

    where = cal.get("tokenizer") or getattr(model.config, "name_or_path", None)
    if not where:
        raise ValueError(
            "LqmodConfig calibration: the model has no directory to read a tokenizer from; set 'tokenizer'"
        )
    tokenizer = AutoTokenizer.from_pretrained(where)
    batches = calibration_batches(
        tokenizer, _model_kind(model), str(cal["text"]), int(cal["n"]), length=int(cal["length"])
    )
    device = next(model.parameters()).device
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def _calibrate_and_quantize(
    model: Any,
    cfg: LqmodConfig,
    entries: Mapping[str, PlanEntry],
    batches: list[dict[str, torch.Tensor]] | None = None,
    stats: Mapping[str, LayerStats] | None = None,
) -> QuantizeReport:
    """Statistics on calibration batches for the layers whose quantizer needs them, then quantization."""
    from lqmod.calibration import collect_hessians, diagonal_fisher, fisher_stats, quantize_model_sequential
    from lqmod.integrations.base import to_quantized_linears

    if batches is None:
        assert cfg.calibration is not None
        batches = _calibration_batches(model, cfg.calibration)
    registry = get_registry()
    needs = {n: registry.quantizer(e.quantizer).needs for n, e in entries.items()}
    given = dict(stats or {})
    fisher_names = [n for n, nd in needs.items() if "fisher" in nd and getattr(given.get(n), "fisher", None) is None]
    if fisher_names:
        given = fisher_stats(diagonal_fisher(model, fisher_names, batches, progress=False), given)
    plan = {"modules": {n: e.model_dump(mode="json") for n, e in entries.items()}}
    if cfg.calibration is not None and cfg.calibration.get("sequential"):
        # lqmod's GPTQ-style driver attaches LoRA adapters at their initial value (B = 0);
        # they are dropped right after, leaving the quantized bases.
        report = quantize_model_sequential(
            model, plan=plan, batches=batches, lora={"r": 1}, stats=given, progress=False
        )
        to_quantized_linears(model)
        return report
    hessian_names = [n for n, nd in needs.items() if "hessian" in nd and getattr(given.get(n), "hessian", None) is None]
    if hessian_names:
        for name, st in collect_hessians(model, hessian_names, batches, progress=False).items():
            old = given.get(name)
            given[name] = st if old is None else LayerStats(
                hessian=st.hessian, n_tokens=st.n_tokens, fisher=old.fisher, act_absmean=st.act_absmean
            )
    return quantize_linears(model, None, None, plan=plan, stats=given)
