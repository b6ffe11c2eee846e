"""``LqmodHfQuantizer``: transformers' side of the ``"lqmod"`` method, and quantization as weights load."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lqmod.config import PlanEntry, validate_config
from lqmod.integrations.base import quantize_one, resolve_entries
from lqmod.integrations.transformers.calibrated import _calibrate_and_quantize
from lqmod.integrations.transformers.config import LqmodConfig
from lqmod.integrations.transformers.records import FORMAT_VERSION, METHOD, PLACEHOLDER_SUFFIX, _dtype, layer_records
from lqmod.model import QuantizeReport, replace_module
from lqmod.nn.quantized_linear import QuantizedLinear
from lqmod.plugins import get_registry
from lqmod.types import QuantizedWeight


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


@register_quantizer(METHOD)
class LqmodHfQuantizer(HfQuantizer):
    """transformers' side of the ``"lqmod"`` method (see the module docstring)."""

    requires_calibration = False
    quantization_config: LqmodConfig

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        if not isinstance(quantization_config, LqmodConfig):
            raise TypeError(f"the lqmod quantizer needs an LqmodConfig, got {type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)
        self.entries: dict[str, PlanEntry] = {}
        self.report = QuantizeReport()
        # With calibration the weights load dense and are quantized after loading.
        self.deferred = False

    # -- what transformers asks -------------------------------------------------------------

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("lqmod quantized layers cannot be offloaded to disk; use a device_map without 'disk'")
        if self.pre_quantized and not self.quantization_config.is_prequantized:
            raise ValueError(
                "the model's config.json has an lqmod quantization_config without per-layer records "
                "('layers'): it was not saved by lqmod's save path; re-quantize it from the dense weights"
            )

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        module_name, _, param = param_name.rpartition(".")
        return not self.pre_quantized and not self.deferred and param == "weight" and module_name in self.entries

    def get_quantize_ops(self) -> Any:
        return _QuantizeOnLoad(self)

    # -- before the weights load ------------------------------------------------------------

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        skip = self.get_modules_to_not_convert(
            model, self.quantization_config.modules_to_not_convert or None, model._keep_in_fp32_modules,
            add_default_skips=True,
        )
        if self.pre_quantized:
            self._build_quantized_skeleton(model)
            return
        cfg = self.quantization_config
        entries = resolve_entries(model, cfg.quantizer, cfg.config, targets=cfg.targets, plan=cfg.plan)
        if cfg.plan is None:
            entries = {n: e for n, e in entries.items() if not _skipped(n, skip)}
        registry = get_registry()
        needing = sorted({e.quantizer for e in entries.values() if registry.quantizer(e.quantizer).needs})
        if needing and cfg.calibration is None:
            raise ValueError(
                f"quantizer(s) {needing} need calibration statistics, which weight-by-weight loading cannot "
                "provide: name calibration text (LqmodConfig(..., calibration={'text': 'wikitext2', 'n': 16})), "
                "or load the model dense, compute statistics with lqmod.calibration and call "
                "lqmod.integrations.transformers.quantize_model(model, LqmodConfig(...), stats=...)"
            )
        self.deferred = cfg.calibration is not None
        for name, entry in entries.items():
            spec = registry.quantizer(entry.quantizer)
            validate_config(spec.config_model, entry.config, what=f"{entry.quantizer} config for {name}")
        self.entries = entries

    def _build_quantized_skeleton(self, model: Any) -> None:
        """Empty (meta) QuantizedLinear layers shaped like the saved ones, so the stored tensors load into them."""
        records = self.quantization_config.layers or {}
        registry = get_registry()
        for name, record in records.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"the lqmod quantization config names layer {name!r}, which this model lacks"
                ) from None
            header = record["header"]
            spec = registry.quantizer(header["quantizer"])
            tensors = {
                k: torch.empty(tuple(shape), dtype=_dtype(dtype), device="meta")
                for k, (shape, dtype) in record["tensors"].items()
            }
            qweight = QuantizedWeight.from_header(header, tensors)
            bias = torch.empty(qweight.shape[0], device="meta") if record.get("bias") else None
            layer = QuantizedLinear(qweight, spec, bias, compute_dtype=_dtype(record.get("compute_dtype", "float32")))
            layer.origin = str(record.get("origin", "linear"))
            old_bias = getattr(old, "bias", None)
            if layer.bias is not None and isinstance(old_bias, nn.Parameter):
                # The model's own (meta) bias carries the dtype the model is loaded in.
                layer.bias = old_bias
                old_bias.requires_grad_(False)
            replace_module(model, name, layer)
        # The placeholders saved in place of the dense weights are expected, not news.
        patterns = {re.escape(name + PLACEHOLDER_SUFFIX) + "$" for name in records}
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | patterns

    # -- after ----------------------------------------------------------------------------

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        for module in model.modules():
            if isinstance(module, QuantizedLinear) and module.bias is not None:
                module.bias.requires_grad_(False)
        if self.deferred:
            self.report = _calibrate_and_quantize(model, self.quantization_config, self.entries)
        if not self.pre_quantized:
            left = [n for n in self.entries if not isinstance(model.get_submodule(n), QuantizedLinear)]
            if left:
                raise RuntimeError(
                    f"{len(left)} selected layer(s) got no weight from the checkpoint and were not quantized, e.g. "
                    f"{left[:3]}"
                )
            self.quantization_config.layers = layer_records(model)
        return model

    def get_state_dict_and_metadata(self, model: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        wrapped = [n for n in layer_records(model) if n.endswith(".base_layer")]
        if wrapped:
            raise ValueError(
                f"{len(wrapped)} quantized layer(s) carry PEFT adapters (e.g. {wrapped[0]!r}): save the adapters "
                "with peft_model.save_pretrained() and the base model before get_peft_model, or merge first "
                "(peft_model.merge_and_unload(), lqmod.integrations.merge.merge_to_dense / merge_and_requantize)"
            )
        state = model.state_dict()
        # Keep config.json's per-layer records in step with the layers (a merge may have re-quantized some).
        self.quantization_config.layers = layer_records(model)
        for name in self.quantization_config.layers:
            state[name + PLACEHOLDER_SUFFIX] = torch.zeros(1, dtype=torch.uint8)
        return state, {"lqmod_format": str(FORMAT_VERSION)}

    def _dequantize(self, model: Any, dtype: torch.dtype | None = None) -> Any:
        from lqmod.integrations.merge import dequantize_model

        return dequantize_model(model, dtype=dtype or torch.float32)


class _QuantizeOnLoad(ConversionOps):
    """transformers' conversion op for one selected weight: quantize it, swap the layer in."""

    def __init__(self, quantizer: LqmodHfQuantizer) -> None:
        self.hf_quantizer = quantizer

    def convert(  # type: ignore[override]
        self,
        input_dict: dict[str, Any],
        *,
        full_layer_name: str | None = None,
        model: nn.Module | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        assert model is not None
        out: dict[str, torch.Tensor] = {}
        registry = get_registry()
        for key, value in input_dict.items():
            weight = value[0] if isinstance(value, list) else value
            name = key.removesuffix(".weight")
            entry = self.hf_quantizer.entries[name]
            old = model.get_submodule(name)
            dense = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            dense.weight = nn.Parameter(weight, requires_grad=False)
            layer, row = quantize_one(dense, registry.quantizer(entry.quantizer), entry.config, None, name=name)
            old_bias = getattr(old, "bias", None)
            if isinstance(old_bias, nn.Parameter):
                # Loaded already or still to come: either way it belongs to the new layer.
                layer.bias = old_bias
            replace_module(model, name, layer)
            self.hf_quantizer.report.layers.append(row)
            if missing_keys is not None:
                missing_keys.discard(key)
        return out
