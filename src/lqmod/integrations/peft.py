"""PEFT's LoRA and DoRA over lqmod's :class:`~lqmod.nn.QuantizedLinear`, any quantizer.

Importing this module is the one registration step::

    import lqmod.integrations.peft  # noqa: F401  (or lqmod.integrations.peft.register())
    model = peft.get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))

It uses PEFT's custom-module dispatch (``LoraConfig._register_custom_module``, the
documented extension point for layer types PEFT does not know): :func:`register` makes every
``LoraConfig`` created afterwards map ``QuantizedLinear`` to :class:`LoraQuantizedLinear`,
which is what lets ``PeftModel.from_pretrained`` (which builds its config from the saved
``adapter_config.json``) work too. A config created before the import can be given the
mapping with :func:`add_to_config`.

What the layer keeps from lqmod: the base runs through
:func:`lqmod.autograd.materialized_linear` in forward and again in backward, so no dense
weight is saved for autograd, with LoRA and with DoRA (whose weight norm is computed from a
materialized weight under ``no_grad`` and then dropped). Merging re-quantizes ``W + dW``
with the layer's own quantizer and config; unmerging restores the exact previous quantized
base (kept aside, it is small), not a second lossy re-quantization.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, LoraLayer
from peft.tuners.lora.variants import DoraLinearVariant
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from lqmod.nn.quantized_linear import QuantizedLinear

__all__ = [
    "LoraQuantizedLinear",
    "add_to_config",
    "is_registered",
    "quantized_module_names",
    "register",
    "target_modules",
]


class _QuantizedDoraLayer(DoraLinearLayer):
    """PEFT's DoRA magnitude module, reading the base weight without saving it for backward.

    PEFT's version builds ``B @ A`` through the LoRA modules (an autograd graph that saves
    an (in, in) identity) and, with dropout active, multiplies the input by the dense weight
    under autograd (saving it). Here the weight norm, which DoRA treats as a constant
    (section 4.3 of the paper, detached in PEFT as well), is computed under ``no_grad`` from
    a freshly materialized weight, and the base output always comes from the quantized
    layer's own materializing forward.
    """

    def forward(
        self,
        x: torch.Tensor,
        *,
        lora_A: nn.Module,
        lora_B: nn.Module,
        scaling: float,
        base_layer: QuantizedLinear,
        base_result: torch.Tensor | None = None,
        adapter_name: str = "default",
    ) -> torch.Tensor:
        with torch.no_grad():
            lora_weight = (_weight(lora_B) @ _weight(lora_A)).to(x.dtype)
            weight = base_layer.dequantize(x.dtype)
            weight_norm = self.get_weight_norm(
                weight=weight, lora_weight=lora_weight, scaling=scaling, adapter_name=adapter_name
            )
            del weight, lora_weight
        mag_norm_scale = (self.weight / weight_norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is None:
            base_result = base_layer(x)
        if base_layer.bias is not None:
            base_result = base_result - base_layer.bias.to(base_result.dtype)
        out: torch.Tensor = (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling
        return out


class _QuantizedDoraVariant(DoraLinearVariant):
    """DoRA for :class:`LoraQuantizedLinear`: PEFT's variant with the magnitude module above."""

    @staticmethod
    def init(module: Any, adapter_name: str, **kwargs: Any) -> None:
        if not module.lora_magnitude_vector:
            # the first DoRA adapter: its magnitude becomes a trainable adapter parameter
            module.adapter_layer_names = (*module.adapter_layer_names, "lora_magnitude_vector")
        dora_layer = _QuantizedDoraLayer(fan_in_fan_out=False)
        dora_layer.update_layer(
            base_layer=module.get_base_layer(),
            lora_A=module.lora_A[adapter_name].weight,
            lora_B=module.lora_B[adapter_name].weight,
            scaling=module.scaling[adapter_name],
        )
        module.lora_magnitude_vector[adapter_name] = dora_layer


class LoraQuantizedLinear(nn.Module, LoraLayer):
    """PEFT LoRA (or DoRA) adapters over a frozen :class:`QuantizedLinear`.

    Follows PEFT's conventions for quantized LoRA layers (the HQQ/bnb ones): the adapters
    live in ``lora_A``/``lora_B`` ``ModuleDict``s keyed by adapter name, so PEFT's
    ``save_pretrained``, ``from_pretrained``, ``set_adapter``, ``disable_adapter`` and
    ``merge_and_unload`` work unchanged.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        if config.lora_bias:
            raise ValueError(
                "LoraConfig(lora_bias=True) is not supported over lqmod QuantizedLinear layers: "
                "a merged bias would change the frozen base; use lora_bias=False"
            )
        if config.fan_in_fan_out:
            raise ValueError(
                "LoraConfig(fan_in_fan_out=True) does not apply to lqmod QuantizedLinear layers, whose "
                "weight is always (out_features, in_features); use fan_in_fan_out=False"
            )
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        # The quantized bases replaced by merges, newest last: unmerge puts them back exactly.
        self._bases_before_merge: list[QuantizedLinear] = []
        self._active_adapter = adapter_name
        for key in ("loaded_in_8bit", "loaded_in_4bit", "ephemeral_gpu_offload", "parameter_name", "device_map"):
            kwargs.pop(key, None)
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # -- PEFT hooks -------------------------------------------------------------------------

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        base = _base_of(module)
        return base.in_features, base.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        # PEFT's default reads ``base_layer.weight``, which would materialize the whole
        # weight just to learn its device.
        base = _base_of(base_layer)
        return base.device, base.compute_dtype

    @property
    def lora_variants(self) -> dict[tuple[str, ...], type[Any] | None]:
        return {(): None, ("use_dora",): _QuantizedDoraVariant}

    # -- merging ----------------------------------------------------------------------------

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        weight_a, weight_b = _weight(self.lora_A[adapter]), _weight(self.lora_B[adapter])
        return (weight_b.float() @ weight_a.float()) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters into the base: ``W + dW`` re-quantized with the base's quantizer.

        Lossy by the quantizer's error on ``W + dW``; :func:`lqmod.integrations.merge.merge_to_dense`
        keeps it exact in a dense dtype instead. Quantizers that need calibration statistics
        (OPTQ) cannot re-quantize here: the error says what to do.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for active_adapter in adapter_names:
            if active_adapter not in self.lora_A:
                continue
            base = _base_of(self.get_base_layer())
            weight = base.dequantize(torch.float32)
            if active_adapter in self.lora_variant:
                new_weight = self.lora_variant[active_adapter].merge_safe(self, active_adapter, weight)
            else:
                new_weight = weight + self.get_delta_weight(active_adapter).to(weight.device)
            if safe_merge and not bool(torch.isfinite(new_weight).all()):
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {active_adapter} seems to be broken"
                )
            self.base_layer = base.requantize(new_weight.float())
            self._bases_before_merge.append(base)
            self.merged_adapters.append(active_adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        device = _base_of(self.get_base_layer()).device
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            self.base_layer = self._bases_before_merge.pop().to(device)
            self._caches.pop(f"{adapter}-weight_norm", None)

    # -- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        variant_kwargs = {k: kwargs.pop(k, None) for k in VARIANT_KWARG_KEYS}
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            out: torch.Tensor = self.base_layer(x, *args, **kwargs)
            return out
        if adapter_names is not None:
            out = self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **variant_kwargs, **kwargs)
            return out
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[active_adapter], self.lora_B[active_adapter]
            dropout, scaling = self.lora_dropout[active_adapter], self.scaling[active_adapter]
            x = self._cast_input_dtype(x, _weight(lora_a).dtype)
            if active_adapter in self.lora_variant:
                result = self.lora_variant[active_adapter].forward(
                    self, active_adapter=active_adapter, x=x, result=result, **variant_kwargs, **kwargs
                )
            else:
                result = result + lora_b(lora_a(dropout(x))) * scaling
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _weight(linear: nn.Module) -> torch.Tensor:
    weight = linear.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _base_of(module: nn.Module) -> QuantizedLinear:
    while not isinstance(module, QuantizedLinear):
        inner = getattr(module, "base_layer", None)
        if inner is None:
            raise TypeError(f"expected an lqmod QuantizedLinear base layer, got {type(module).__name__}")
        module = inner
    return module


# -- registration -------------------------------------------------------------------------

_MAPPING: dict[type[nn.Module], type[nn.Module]] = {QuantizedLinear: LoraQuantizedLinear}
_ORIGINAL_POST_INIT = LoraConfig.__post_init__
_registered = False


def add_to_config(config: LoraConfig) -> LoraConfig:
    """Give one ``LoraConfig`` the QuantizedLinear mapping (for configs made before :func:`register`)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module(dict(_MAPPING))
    return config


def _post_init(self: LoraConfig) -> None:
    _ORIGINAL_POST_INIT(self)
    self._register_custom_module(dict(_MAPPING))


def register() -> None:
    """Make every ``LoraConfig`` created from now on dispatch QuantizedLinear to lqmod's LoRA layer.

    Idempotent. PEFT's custom-module mapping is per config and not saved with the adapter,
    so it is added in ``LoraConfig.__post_init__``; that is what makes
    ``PeftModel.from_pretrained`` (which re-creates the config from disk) work.
    """
    global _registered
    if _registered:
        return
    LoraConfig.__post_init__ = _post_init  # type: ignore[method-assign]
    _registered = True


def is_registered() -> bool:
    return _registered


def quantized_module_names(model: nn.Module) -> list[str]:
    """Full names of the model's QuantizedLinear layers (PEFT LoRA layers over them included)."""
    return [
        name.removesuffix(".base_layer")
        for name, m in model.named_modules()
        if isinstance(m, QuantizedLinear)
    ]


def target_modules(model: nn.Module, *, include: Iterable[str] | None = None) -> list[str]:
    """The distinct last-name components of the quantized layers (``["down_proj", "q_proj", ...]``),
    a ``target_modules`` list for ``LoraConfig``.

    ``target_modules="all-linear"`` does not see QuantizedLinear layers (PEFT selects
    ``nn.Linear`` and ``Conv1D`` by type); pass this instead. ``include`` keeps only the
    names listed.
    """
    names = sorted({n.rpartition(".")[2] for n in quantized_module_names(model)})
    if include is not None:
        wanted = set(include)
        names = [n for n in names if n in wanted]
    if not names:
        raise ValueError("the model has no lqmod QuantizedLinear layers to target; quantize it first")
    return names


register()
