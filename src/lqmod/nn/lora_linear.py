"""The one generic LoRA linear layer over any quantizer.

``y = x W_q^T + b + (alpha / r) * B A dropout(x)`` where ``W_q = materialize(qweight)`` is
rebuilt from the quantized tensors in forward and again in backward (see
:mod:`lqmod.autograd`). Only ``lora_A``, ``lora_B`` (and the bias, if asked) train.
"""

from __future__ import annotations

import torch
from torch import nn

from lqmod.autograd import materialized_linear
from lqmod.config import LoRAConfig
from lqmod.kernels.base import KernelBackend, select_backend
from lqmod.types import QuantizedWeight, QuantizerSpec

__all__ = ["LoRALinear", "QuantizedBase"]


class QuantizedBase(nn.Module):
    """Holds a :class:`QuantizedWeight`'s tensors as buffers so ``.to()`` and state dicts see them."""

    def __init__(self, qweight: QuantizedWeight) -> None:
        super().__init__()
        self.header = qweight.header()
        self.names = tuple(sorted(qweight.tensors))
        for name in self.names:
            self.register_buffer(name, qweight.tensors[name])
        # The template keeps only metadata: holding the tensors here would keep a second copy
        # alive after ``.to(device)`` moves the buffers.
        self._template = QuantizedWeight(
            qweight.quantizer, qweight.config, qweight.shape, {}, qweight.meta, qweight.dtype
        )

    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(
            self._template.quantizer,
            self._template.config,
            self._template.shape,
            {n: getattr(self, n) for n in self.names},
            self._template.meta,
            self._template.dtype,
        )

    def extra_repr(self) -> str:
        return f"{self._template.quantizer}, shape={self._template.shape}"


class LoRALinear(nn.Module):
    """A frozen quantized linear layer plus a trainable low-rank adapter."""

    def __init__(
        self,
        qweight: QuantizedWeight,
        spec: QuantizerSpec,
        lora: LoRAConfig,
        *,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        out_features, in_features = qweight.shape
        if qweight.quantizer != spec.name:
            raise ValueError(f"weight was quantized by {qweight.quantizer!r}, spec is {spec.name!r}")
        if lora_a.shape != (lora.r, in_features) or lora_b.shape != (out_features, lora.r):
            raise ValueError(
                f"adapter shapes A{tuple(lora_a.shape)} B{tuple(lora_b.shape)} do not fit a "
                f"rank-{lora.r} adapter of a ({out_features}, {in_features}) weight: expected "
                f"A({lora.r}, {in_features}) and B({out_features}, {lora.r})"
            )
        self.in_features, self.out_features = in_features, out_features
        self.lora_config = lora
        self.scaling = lora.scaling
        self.base = QuantizedBase(qweight)
        # Direct reference: the hot path never goes through the plug-in manager.
        self._materialize = spec.materialize
        self._lut_format = spec.lut_format
        self.quantizer = spec.name
        self.lora_A = nn.Parameter(lora_a.detach().clone())
        self.lora_B = nn.Parameter(lora_b.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=lora.train_bias)
        self.dropout: nn.Module = nn.Dropout(lora.dropout) if lora.dropout > 0 else nn.Identity()
        self.adapters_enabled = True
        # "conv1d" when this layer replaced a transformers Conv1D ((in, out) weight layout),
        # so exports can rebuild the original module type.
        self.origin = "linear"
        self._backend: KernelBackend | None = None
        self._backend_device: torch.device | None = None

    # -- helpers -----------------------------------------------------------------------

    @property
    def qweight(self) -> QuantizedWeight:
        return self.base.qweight()

    def backend(self, device: torch.device) -> KernelBackend:
        if self._backend is None or self._backend_device != device:
            self._backend = select_backend(self.qweight, device, lut_format=self._lut_format)
            self._backend_device = device
        return self._backend

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The materialized base weight (no adapter), for export and evaluation."""
        with torch.no_grad():
            return self._materialize(self.qweight, dtype)

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Base weight plus the adapter's update, in ``dtype``."""
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            return (self.dense_weight(torch.float32) + delta).to(dtype)

    # -- forward -----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        y = materialized_linear(
            x,
            self.qweight,
            self._materialize,
            self.backend(x.device),
            save_dense=not self.lora_config.materialize_in_backward,
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.adapters_enabled:
            h = self.dropout(x).to(self.lora_A.dtype)
            update = torch.nn.functional.linear(torch.nn.functional.linear(h, self.lora_A), self.lora_B)
            y = y + (update * self.scaling).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"quantizer={self.quantizer}, r={self.lora_config.r}, alpha={self.lora_config.alpha}, "
            f"bits_per_param={self.qweight.bits_per_param():.3f}"
        )
