"""One interface over every row: lqmod quantizers (through the plug-in registry) and baselines.

:func:`build_method` turns a :class:`~lqmod.bench.matrix.RowSpec` into a :class:`Method`
whose ``quantize(weight, hessian, n_tokens, fisher=None)`` returns a
:class:`~lqmod.bench.baselines.Quantized`. Anything that prevents the row from running (an
unregistered name, a rejected config, a missing package) raises :class:`Unavailable` or a
``ValueError`` whose message becomes the row's reason.
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from typing import Protocol

import torch

from lqmod.bench.baselines import Quantized, Unavailable, make_baseline
from lqmod.bench.matrix import RowSpec
from lqmod.config import LoRAConfig, validate_config
from lqmod.plugins import Registry, UnknownPluginError
from lqmod.quantize import quantize_weight, resolve_config
from lqmod.types import LayerStats

__all__ = ["Method", "Unavailable", "build_method"]

class QuantizeFn(Protocol):
    def __call__(
        self, weight: torch.Tensor, hessian: torch.Tensor | None, n_tokens: int, fisher: torch.Tensor | None = None
    ) -> Quantized: ...


@dataclass(frozen=True)
class Method:
    row: RowSpec
    source: str  # package (and version) or plug-in distribution that does the work
    needs_hessian: bool
    quantize: QuantizeFn
    needs_fisher: bool = False


def _dist_version(dist: str) -> str:
    try:
        return f"{dist} {md.version(dist)}"
    except (md.PackageNotFoundError, ValueError):
        return dist


def _lqmod_method(row: RowSpec, registry: Registry) -> Method:
    try:
        spec = registry.quantizer(row.name)
    except UnknownPluginError as exc:
        raise Unavailable(f"not registered: {exc}") from None
    cfg = resolve_config(spec, dict(row.config))
    unsupported = sorted(spec.needs - {"hessian", "fisher"})
    if unsupported:
        raise Unavailable(f"needs statistics the benchmark does not collect: {unsupported}")
    lora = validate_config(LoRAConfig, dict(row.lora), what="lora config") if row.lora else None
    init_spec = init_cfg = None
    if lora is not None:
        init_spec = registry.initializer(lora.initializer)
        init_cfg = validate_config(
            init_spec.config_model, {**lora.initializer_config, **row.init}, what=f"{init_spec.name} initializer config"
        )
    generator = torch.Generator().manual_seed(0)

    def quantize(
        weight: torch.Tensor, hessian: torch.Tensor | None, n_tokens: int, fisher: torch.Tensor | None = None
    ) -> Quantized:
        has = hessian is not None or fisher is not None
        stats = LayerStats(hessian=hessian, n_tokens=n_tokens, fisher=fisher) if has else None
        qw = quantize_weight(spec, weight, cfg, stats)
        if init_spec is None or lora is None:
            return Quantized(spec.materialize(qw, torch.float32), qw.storage_bits())
        init = init_spec.initialize(
            weight=weight,
            qweight=qw,
            materialize=spec.materialize,
            lora=lora,
            config=init_cfg,
            stats=stats,
            generator=generator,
        )
        qw = init.qweight or qw
        delta = (init.lora_b.float() @ init.lora_a.float()) * lora.scaling
        # Adapters count at 16 bits, as for the LoftQ baseline: the error includes them.
        adapter_bits = 16 * (init.lora_a.numel() + init.lora_b.numel())
        return Quantized(spec.materialize(qw, torch.float32) + delta, qw.storage_bits() + adapter_bits)

    dist = registry.origin("lqmod_quantizers", row.name)
    return Method(row, _dist_version(dist), "hessian" in spec.needs, quantize, needs_fisher="fisher" in spec.needs)


def build_method(row: RowSpec, registry: Registry) -> Method:
    """The runnable method for ``row``; raises Unavailable / ValueError with the reason."""
    if row.kind == "lqmod":
        return _lqmod_method(row, registry)
    baseline = make_baseline(row.name, dict(row.config))
    baseline.prepare()

    def quantize(
        weight: torch.Tensor, hessian: torch.Tensor | None, n_tokens: int, fisher: torch.Tensor | None = None
    ) -> Quantized:
        return baseline.quantize(weight, hessian)

    return Method(row, baseline.source, baseline.needs_hessian, quantize)
