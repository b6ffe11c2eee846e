"""``quantize_model``: every selected layer of a model quantized, all or nothing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from lqmod.config import LoRAConfig, Plan, TargetConfig
from lqmod.model.layer_quantizer import LayerQuantizer
from lqmod.model.reports import LayerReport, QuantizeReport
from lqmod.nn.lora_linear import LoRALinear
from lqmod.plugins import Registry
from lqmod.types import LayerStats


def quantize_model(
    model: nn.Module,
    quantizer: str | None = "nf",
    config: Any = None,
    *,
    lora: LoRAConfig | Mapping[str, Any] | None = None,
    targets: TargetConfig | Mapping[str, Any] | None = None,
    plan: Plan | Mapping[str, Any] | None = None,
    stats: Mapping[str, LayerStats] | None = None,
    registry: Registry | None = None,
    seed: int = 0,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize ``model`` in place and attach LoRA adapters; freeze everything else.

    Either one ``quantizer`` + ``config`` for every layer ``targets`` selects, or a ``plan``
    (module name -> quantizer and config, e.g. from an allocator). A quantizer whose
    ``spec.needs`` names statistics (``"hessian"``, ``"fisher"``) must get them in ``stats``;
    a layer lacking them is an error before any layer is touched.

    All or nothing: every layer is quantized into a new module first, and the modules are
    swapped in (and the model frozen) only once all of them succeeded, so an error at any
    layer leaves ``model`` exactly as it was. The price is memory: until the swap the
    quantized layers (a fraction of the dense size) live beside the dense model.
    """
    lq = LayerQuantizer(
        model, quantizer, config, lora=lora, targets=targets, plan=plan, registry=registry, seed=seed
    )
    lq.check_stats(stats)
    built: list[tuple[str, LoRALinear, LayerReport]] = []
    for name in tqdm(list(lq.entries), desc="quantizing", unit="layer", disable=not progress):
        new, layer_report = lq.build(name, stats.get(name) if stats else None)
        built.append((name, new, layer_report))
    try:
        lq.freeze()
        for name, new, _ in built:
            lq.swap(name, new)
    except BaseException:
        lq.rollback()
        raise
    return QuantizeReport([r for _, _, r in built])
