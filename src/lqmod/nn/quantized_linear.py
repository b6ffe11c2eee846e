"""A frozen quantized linear layer, without an adapter: the base other libraries wrap.

``y = x W_q^T + b`` with ``W_q = materialize(qweight)`` rebuilt from the quantized tensors in
forward and again in backward (:func:`lqmod.autograd.materialized_linear`), so the dense
weight is never saved for autograd. Adapters come from elsewhere: PEFT's LoRA/DoRA through
:mod:`lqmod.integrations.peft`, or transformers' loading through
:mod:`lqmod.integrations.transformers`.

Code that needs a dense weight (PEFT's DoRA norms, merging, export) reads :attr:`weight` or
calls :meth:`dequantize`: both materialize a fresh tensor on every call, which the layer
does not keep.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lqmod.autograd import materialized_linear
from lqmod.kernels.base import KernelBackend, select_backend
from lqmod.quantize import quantize_weight
from lqmod.types import LayerStats, QuantizedWeight, QuantizerSpec

__all__ = ["QuantizedBase", "QuantizedLinear"]


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


class QuantizedLinear(nn.Module):
    """``x @ materialize(qweight).T + bias``, differentiable in ``x`` only.

    ``compute_dtype`` is the dtype the weight is materialized in when something asks for a
    dense weight (:attr:`weight`); the forward pass materializes in the input's dtype.
    ``materialize_in_backward=False`` keeps the dense weight for backward instead (the
    QLoRA-style baseline), for comparisons.
    """

    def __init__(
        self,
        qweight: QuantizedWeight,
        spec: QuantizerSpec,
        bias: torch.Tensor | None = None,
        *,
        compute_dtype: torch.dtype | None = None,
        materialize_in_backward: bool = True,
    ) -> None:
        super().__init__()
        if qweight.quantizer != spec.name:
            raise ValueError(f"weight was quantized by {qweight.quantizer!r}, spec is {spec.name!r}")
        out_features, in_features = qweight.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")
        self.in_features, self.out_features = in_features, out_features
        self.base = QuantizedBase(qweight)
        # Direct references: the hot path never goes through the plug-in manager.
        self._spec = spec
        self._materialize = spec.materialize
        self.quantizer = spec.name
        self.compute_dtype = compute_dtype or qweight.dtype
        self.materialize_in_backward = materialize_in_backward
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # "conv1d" when this layer replaced a transformers Conv1D ((in, out) weight layout), so
        # dense exports rebuild the original module type.
        self.origin = "linear"
        self._backend: KernelBackend | None = None
        self._backend_device: torch.device | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        spec: QuantizerSpec,
        config: object = None,
        stats: LayerStats | None = None,
        *,
        name: str = "weight",
    ) -> QuantizedLinear:
        """Quantize an ``nn.Linear``'s weight with ``spec`` (validated) and keep its bias."""
        qweight = quantize_weight(spec, linear.weight.detach(), config, stats, name=name)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(qweight, spec, bias, compute_dtype=linear.weight.dtype)

    # -- the quantized weight ---------------------------------------------------------------

    @property
    def spec(self) -> QuantizerSpec:
        return self._spec

    @property
    def qweight(self) -> QuantizedWeight:
        """The quantized weight, viewing this layer's buffers (no copy)."""
        return self.base.qweight()

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in ``dtype`` (default :attr:`compute_dtype`), freshly
        materialized and detached: nothing is kept, and no gradient flows into it."""
        with torch.no_grad():
            return self._materialize(self.qweight, dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A freshly materialized dense weight, for code that reads ``module.weight``
        (PEFT's DoRA, device/dtype probes). Writing to it changes nothing: the layer's
        state is the quantized tensors; re-quantize to change it."""
        return self.dequantize()

    def backend(self, device: torch.device) -> KernelBackend:
        if self._backend is None or self._backend_device != device:
            self._backend = select_backend(self.qweight, device, lut_format=self._spec.lut_format)
            self._backend_device = device
        return self._backend

    def requantize(self, weight: torch.Tensor, stats: LayerStats | None = None) -> QuantizedLinear:
        """A new layer holding ``weight`` quantized with this layer's quantizer and config."""
        qweight = quantize_weight(self._spec, weight.detach(), self.qweight.config, stats)
        bias = None if self.bias is None else self.bias.detach()
        layer = type(self)(
            qweight.to(self.device),
            self._spec,
            bias,
            compute_dtype=self.compute_dtype,
            materialize_in_backward=self.materialize_in_backward,
        )
        layer.origin = self.origin
        return layer

    def to_dense(self, dtype: torch.dtype | None = None, weight: torch.Tensor | None = None) -> nn.Module:
        """A plain ``nn.Linear`` (or transformers ``Conv1D``, if this layer replaced one) holding
        ``weight`` (default: this layer's materialized weight) in ``dtype``: what plain
        transformers loads."""
        dtype = dtype or self.compute_dtype
        w = (self.dequantize(torch.float32) if weight is None else weight.detach()).to(dtype)
        bias = None if self.bias is None else self.bias.detach().to(dtype)
        if self.origin == "conv1d":
            from transformers.pytorch_utils import Conv1D

            conv = Conv1D(self.out_features, self.in_features)
            conv.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
            conv.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype) if bias is None else bias)
            return conv.to(w.device)
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias, requires_grad=False)
        return lin

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]  # torch's own signature
        # ``model.to(torch.bfloat16)`` / ``.half()`` must not cast the quantized tensors: their
        # dtypes are part of the format (a float32 scale rounded to bf16 changes every weight).
        # They only follow device moves; a float cast changes the compute dtype (and the bias).
        for name in self.base.names:
            t = self.base._buffers[name]
            assert t is not None
            moved = fn(t)
            if moved.dtype != t.dtype:
                moved = t.to(moved.device)
            self.base._buffers[name] = moved
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return super()._apply(fn, recurse=False)

    # -- forward ----------------------------------------------------------------------------

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` without the bias; ``W`` is materialized here and again in backward."""
        return materialized_linear(
            x,
            self.qweight,
            self._materialize,
            self.backend(x.device),
            save_dense=not self.materialize_in_backward,
        )

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        return self.add_bias(self.linear(x))

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quantizer={self.quantizer}, bits_per_param={self.qweight.bits_per_param():.3f}"
        )
        # PEFT's "Target module ... is not supported" error prints the module: until the PEFT
        # integration is imported, the repr names the one call that makes PEFT accept it.
        if "lqmod.integrations.peft" not in sys.modules:
            text += " [for PEFT: import lqmod.integrations.peft before creating the LoraConfig]"
        return text
