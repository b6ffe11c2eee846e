"""The one generic adapted linear layer: a frozen quantized base plus a registered adapter.

``y = adapter(x, x W_q^T) + b``, where ``W_q = materialize(qweight)`` is rebuilt from the
quantized tensors in forward and again in backward by the base
(:class:`~lqmod.nn.quantized_linear.QuantizedLinear`, see :mod:`lqmod.autograd`), and the
adapter is the variant ``LoRAConfig.adapter`` names (LoRA's is
``x W_q^T + (alpha / r) B A dropout(x)``). Only the adapter's parameters (and the bias, if
asked) train.

The layer owns two children: ``base_layer`` (the frozen base, reusable on its own) and
``adapter``. ``lora_A``, ``lora_B``, ``bias``, ``qweight`` and ``base`` read through to them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lqmod.config import LoRAConfig, validate_config
from lqmod.kernels.base import KernelBackend
from lqmod.nn.adapter import Adapter
from lqmod.nn.quantized_linear import QuantizedBase, QuantizedLinear
from lqmod.types import AdapterSpec, QuantizedWeight, QuantizerSpec

__all__ = ["LoRALinear", "QuantizedBase"]


class LoRALinear(nn.Module):
    """A frozen quantized linear layer plus a trainable adapter (LoRA, DoRA, IEC, ...).

    ``adapter`` is the variant's spec; by default the registry's entry for ``lora.adapter``
    (resolved once, here: the forward never goes through the plug-in manager).
    """

    def __init__(
        self,
        qweight: QuantizedWeight,
        spec: QuantizerSpec,
        lora: LoRAConfig,
        *,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        bias: torch.Tensor | None = None,
        adapter: AdapterSpec | None = None,
    ) -> None:
        super().__init__()
        base = QuantizedLinear(
            qweight, spec, bias, compute_dtype=lora_a.dtype, materialize_in_backward=lora.materialize_in_backward
        )
        self._attach(base, lora, lora_a, lora_b, adapter)

    @classmethod
    def from_base(
        cls,
        base: QuantizedLinear,
        lora: LoRAConfig,
        *,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        adapter: AdapterSpec | None = None,
    ) -> LoRALinear:
        """Adapt an existing frozen base (its quantized tensors are shared, not copied)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        base.materialize_in_backward = lora.materialize_in_backward
        layer._attach(base, lora, lora_a, lora_b, adapter)
        return layer

    def _attach(
        self,
        base: QuantizedLinear,
        lora: LoRAConfig,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        adapter: AdapterSpec | None,
    ) -> None:
        out_features, in_features = base.out_features, base.in_features
        if lora_a.shape != (lora.r, in_features) or lora_b.shape != (out_features, lora.r):
            raise ValueError(
                f"adapter shapes A{tuple(lora_a.shape)} B{tuple(lora_b.shape)} do not fit a "
                f"rank-{lora.r} adapter of a ({out_features}, {in_features}) weight: expected "
                f"A({lora.r}, {in_features}) and B({out_features}, {lora.r})"
            )
        if adapter is None:
            from lqmod.plugins import get_registry  # the registry imports the nn modules' users

            adapter = get_registry().adapter(lora.adapter)
        elif adapter.name != lora.adapter:
            raise ValueError(f"adapter spec is {adapter.name!r} but the LoRA config asks for {lora.adapter!r}")
        self.in_features, self.out_features = in_features, out_features
        self.lora_config = lora
        self.scaling = lora.scaling
        self.adapters_enabled = True
        self.adapter_spec = adapter
        self.adapter_config: Any = validate_config(
            adapter.config_model, lora.adapter_config, what=f"{adapter.name} adapter config"
        )
        if base.bias is not None:
            base.bias.requires_grad_(lora.train_bias)
        self.base_layer = base
        module = adapter.build(base=base, lora=lora, config=self.adapter_config, lora_a=lora_a, lora_b=lora_b)
        if not isinstance(module, Adapter):
            raise TypeError(
                f"adapter {adapter.name!r} built a {type(module).__name__}; it must build an lqmod.nn.adapter.Adapter"
            )
        self.adapter = module

    # -- read-through to the children ---------------------------------------------------

    @property
    def adapter_name(self) -> str:
        return self.adapter_spec.name

    @property
    def quantizer(self) -> str:
        return self.base_layer.quantizer

    @property
    def qweight(self) -> QuantizedWeight:
        return self.base_layer.qweight

    @property
    def base(self) -> QuantizedBase:
        """The quantized tensors' holder (buffers) of the frozen base."""
        return self.base_layer.base

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base_layer.bias

    @property
    def lora_A(self) -> nn.Parameter:
        return self.adapter.lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        return self.adapter.lora_B

    @property
    def origin(self) -> str:
        """"conv1d" when this layer replaced a transformers Conv1D ((in, out) weight layout),
        so exports can rebuild the original module type."""
        return self.base_layer.origin

    @origin.setter
    def origin(self, value: str) -> None:
        self.base_layer.origin = value

    def backend(self, device: torch.device) -> KernelBackend:
        return self.base_layer.backend(device)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The materialized base weight (no adapter), for export and evaluation."""
        return self.base_layer.dequantize(dtype)

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight the adapted layer computes with (base and adapter), in ``dtype``."""
        with torch.no_grad():
            return self.adapter.merged_weight(self.dense_weight(torch.float32)).to(dtype)

    # -- forward -----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        y = self.base_layer.linear(x)
        if self.adapters_enabled:
            y = self.adapter(x, y, self.base_layer)
        return self.base_layer.add_bias(y)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"quantizer={self.quantizer}, adapter={self.adapter_name}, r={self.lora_config.r}, "
            f"alpha={self.lora_config.alpha}, bits_per_param={self.qweight.bits_per_param():.3f}"
        )
