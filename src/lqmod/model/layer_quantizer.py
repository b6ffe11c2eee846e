"""``LayerQuantizer``: one layer quantized, initialized and swapped in at a time, with rollback."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lqmod.config import LoRAConfig, Plan, TargetConfig, validate_config
from lqmod.model.reports import LayerReport
from lqmod.model.targets import _dense_weight, _is_conv1d, _layer_shape, _resolve_entries, replace_module
from lqmod.nn.lora_linear import LoRALinear
from lqmod.plugins import Registry, get_registry
from lqmod.quantize import QuantizationError, check_materialized, quantize_weight, relative_error
from lqmod.types import AdapterSpec, LayerStats, QuantizedWeight, QuantizerSpec


def build_lora_linear(
    qweight: QuantizedWeight,
    spec: QuantizerSpec,
    lora: LoRAConfig,
    *,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
    adapter: AdapterSpec | None = None,
) -> LoRALinear:
    return LoRALinear(qweight, spec, lora, lora_a=lora_a, lora_b=lora_b, bias=bias, adapter=adapter)


def missing_stats_message(name: str, quantizer: str, missing: Sequence[str], *, initializer: str | None = None) -> str:
    """The error for a layer whose quantizer (or LoRA initializer) needs statistics nobody supplied: what and how."""
    how = {
        "hessian": "lqmod.calibration.collect_hessians(model, names, batches)",
        "fisher": "lqmod.calibration.fisher_stats(lqmod.calibration.diagonal_fisher(model, names, batches))",
    }
    who = f"quantizer {quantizer!r}" if initializer is None else f"LoRA initializer {initializer!r}"
    recipes = "; ".join(f"{m!r}: {how.get(m, 'a LayerStats field ' + repr(m))}" for m in missing)
    return (
        f"layer {name!r}: {who} needs calibration statistics {list(missing)} that were not "
        f"supplied for this layer. Compute them on real text and pass stats={{name: LayerStats}} to "
        f"quantize_model ({recipes}), or call lqmod.calibration.quantize_model_sequential(..., batches=...) "
        "for Hessians; on the command line add --calib-text wikitext2 --n-calib N"
    )


def _missing_stats(needs: frozenset[str], layer_stats: LayerStats | None) -> list[str]:
    return [s for s in sorted(needs) if layer_stats is None or getattr(layer_stats, s, None) is None]


class LayerQuantizer:
    """The per-layer machinery of :func:`quantize_model`, resolved and checked once.

    Building it validates every name and config (the model is untouched if that fails);
    :meth:`quantize` then swaps one layer at a time, so a driver (e.g. the sequential,
    block-by-block calibration in :mod:`lqmod.calibration`) can interleave statistics
    gathering with quantization while producing exactly what ``quantize_model`` would.
    """

    def __init__(
        self,
        model: nn.Module,
        quantizer: str | None,
        config: Any,
        *,
        lora: LoRAConfig | Mapping[str, Any] | None,
        targets: TargetConfig | Mapping[str, Any] | None,
        plan: Plan | Mapping[str, Any] | None,
        registry: Registry | None,
        seed: int,
    ) -> None:
        registry = registry or get_registry()
        self.model = model
        self.lora_cfg: LoRAConfig = validate_config(LoRAConfig, lora, what="lora config")
        target_cfg: TargetConfig = validate_config(TargetConfig, targets, what="targets")
        self.entries = _resolve_entries(model, quantizer, config, target_cfg, plan)
        self.init_spec = registry.initializer(self.lora_cfg.initializer)
        self.init_cfg = validate_config(
            self.init_spec.config_model,
            self.lora_cfg.initializer_config,
            what=f"{self.init_spec.name} initializer config",
        )
        # Resolve every quantizer and config before touching the model: a bad name or value fails
        # fast and leaves the model as it was.
        self.specs = {name: registry.quantizer(e.quantizer) for name, e in self.entries.items()}
        for name, e in self.entries.items():
            validate_config(self.specs[name].config_model, e.config, what=f"{e.quantizer} config for {name}")
        self.adapter_spec = registry.adapter(self.lora_cfg.adapter)
        adapter_cfg = validate_config(
            self.adapter_spec.config_model,
            self.lora_cfg.adapter_config,
            what=f"{self.adapter_spec.name} adapter config",
        )
        if self.adapter_spec.check is not None:
            for name in self.entries:
                try:
                    self.adapter_spec.check(_layer_shape(model.get_submodule(name)), self.lora_cfg, adapter_cfg)
                except ValueError as exc:
                    raise ValueError(f"layer {name!r}: {exc}") from None
        self.generator = torch.Generator().manual_seed(seed)
        self._originals: dict[str, nn.Module] = {}
        self._requires_grad: dict[nn.Parameter, bool] = {}

    def needs(self, name: str) -> frozenset[str]:
        """Statistics layer ``name`` needs: its quantizer's and the LoRA initializer's."""
        return self.specs[name].needs | self.init_spec.needs

    def _missing_message(self, name: str, missing: Sequence[str]) -> str:
        # Name the initializer when it, not the quantizer, asks for a missing statistic.
        by_init = None if set(missing) <= self.specs[name].needs else self.init_spec.name
        return missing_stats_message(name, self.specs[name].name, missing, initializer=by_init)

    def check_stats(self, stats: Mapping[str, LayerStats] | None, names: Sequence[str] | None = None) -> None:
        """Raise a clear error naming the first layer whose quantizer lacks the statistics it needs."""
        for name in self.entries if names is None else names:
            missing = _missing_stats(self.needs(name), stats.get(name) if stats else None)
            if missing:
                raise QuantizationError(self._missing_message(name, missing))

    def freeze(self) -> None:
        """Freeze every parameter, remembering the flags so :meth:`rollback` can restore them."""
        for p in self.model.parameters():
            self._requires_grad.setdefault(p, p.requires_grad)
            p.requires_grad_(False)

    def build(self, name: str, layer_stats: LayerStats | None) -> tuple[LoRALinear, LayerReport]:
        """Quantize layer ``name`` and attach its adapters, *without* touching the model."""
        model, spec = self.model, self.specs[name]
        module = model.get_submodule(name)
        missing = _missing_stats(self.needs(name), layer_stats)
        if missing:
            raise QuantizationError(self._missing_message(name, missing))
        weight = _dense_weight(module)
        qweight = quantize_weight(
            spec, weight, self.entries[name].config, layer_stats, name=name, check_finite=False
        )
        init = self.init_spec.initialize(
            weight=weight,
            qweight=qweight,
            materialize=spec.materialize,
            lora=self.lora_cfg,
            config=self.init_cfg,
            stats=layer_stats,
            generator=self.generator,
        )
        if init.qweight is not None:
            # The layer keeps the spec it was quantized with: a replacement base must be the
            # same quantizer's weight of the same shape, or it would be materialized wrongly.
            if init.qweight.quantizer != spec.name or tuple(init.qweight.shape) != tuple(qweight.shape):
                raise ValueError(
                    f"{name}: initializer {self.init_spec.name!r} returned a replacement base of quantizer "
                    f"{init.qweight.quantizer!r} shape {tuple(init.qweight.shape)}; this layer needs a "
                    f"{spec.name!r} weight of shape {tuple(qweight.shape)}"
                )
            qweight = init.qweight
        bias = getattr(module, "bias", None)
        new = build_lora_linear(
            qweight.to(weight.device),
            spec,
            self.lora_cfg,
            lora_a=init.lora_a.to(weight.device),
            lora_b=init.lora_b.to(weight.device),
            bias=None if bias is None else bias.data,
            adapter=self.adapter_spec,
        )
        with torch.no_grad():
            deq = spec.materialize(qweight, torch.float32)
            # A weight that materializes inf/NaN would train and save as garbage: refuse it here.
            check_materialized(spec, qweight, deq, name=name)
            err = relative_error(deq, weight)
        new.origin = "conv1d" if _is_conv1d(module) else "linear"
        report = LayerReport(
            name,
            (qweight.shape[0], qweight.shape[1]),
            spec.name,
            qweight.config,
            qweight.bits_per_param(),
            err,
        )
        return new, report

    def swap(self, name: str, new: nn.Module) -> None:
        """Put ``new`` in place of layer ``name``, remembering the original for :meth:`rollback`."""
        self._originals.setdefault(name, self.model.get_submodule(name))
        replace_module(self.model, name, new)

    def quantize(self, name: str, layer_stats: LayerStats | None) -> LayerReport:
        """Quantize layer ``name``, attach its adapters and swap it into the model."""
        new, report = self.build(name, layer_stats)
        self.swap(name, new)
        return report

    def rollback(self) -> None:
        """Undo every :meth:`swap` and :meth:`freeze`: the model is as it was before."""
        for name, original in reversed(list(self._originals.items())):
            replace_module(self.model, name, original)
        self._originals.clear()
        for p, flag in self._requires_grad.items():
            p.requires_grad_(flag)
        self._requires_grad.clear()
