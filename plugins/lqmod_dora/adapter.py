"""DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") over a quantized base.

``W' = m * (W + s B A) / ||W + s B A||_c`` where ``||.||_c`` is the L2 norm of each output
row over the input dimension (PEFT's ``torch.linalg.norm(weight, dim=1)``), ``s = alpha / r``,
and ``m`` (out,) starts at the norm of the initial ``W + s B A`` (so step 0 computes exactly
what LoRA would). The norm is treated as a constant (detached, DoRA section 4.3, PEFT's
convention), so

    y = (m / n) * (x W^T + s B A x) + b,      n = ||W + s B A||_c  (no gradient)

and the base term ``x W^T`` is the frozen base's materialize-in-forward-and-backward product.

The norm is computed without a dense ``W + s B A``: ``||W_i + s (BA)_i||^2 = ||W_i||^2 +
2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T``, where ``||W_i||^2`` is kept per row (out
floats, derived from the base when the adapter is built, never stored in checkpoints) and
``W A^T`` is one base product with the r rows of ``A``, under ``no_grad``. Nothing of size
``out x in`` is saved for backward.

With dropout in training, PEFT applies the DoRA rescaling to the dropped input's base
product: ``y = x W^T + (m/n - 1) drop(x) W^T + (m/n) s B A drop(x) + b`` (one extra base
product); this module does the same so the two agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lqmod.config import LoRAConfig
from lqmod.nn.adapter import Adapter
from lqmod.nn.quantized_linear import QuantizedLinear

__all__ = ["DoRAAdapter"]


class DoRAAdapter(Adapter):
    """LoRA's ``A``, ``B`` plus the magnitude vector ``magnitude`` (out,)."""

    weight_sq: torch.Tensor
    detached_params = frozenset({"lora_A", "lora_B"})

    def __init__(self, lora: LoRAConfig, lora_a: torch.Tensor, lora_b: torch.Tensor, weight: torch.Tensor) -> None:
        super().__init__(lora, lora_a, lora_b)
        w = weight.detach().double()
        # Derived from the frozen base, so not part of the state dict (rebuilt on load).
        self.register_buffer("weight_sq", w.pow(2).sum(dim=1), persistent=False)
        with torch.no_grad():
            delta = (lora_b.double() @ lora_a.double()) * self.scaling
            m = torch.linalg.vector_norm(w + delta, dim=1)
        self.magnitude = nn.Parameter(m.to(lora_a.dtype))
        self._pinned: torch.Tensor | None = None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]  # torch's own signature
        # ``.to(bfloat16)`` must not round the row norms of W (they enter every output row's
        # scale): the buffer follows device moves only.
        sq = self._buffers["weight_sq"]
        assert sq is not None
        out = super()._apply(fn, recurse)
        moved = self._buffers["weight_sq"]
        assert moved is not None
        if moved.dtype != sq.dtype:
            self._buffers["weight_sq"] = sq.to(moved.device)
        return out

    def _compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32

    @contextlib.contextmanager
    def pinned_detached(self, base: QuantizedLinear) -> Iterator[None]:
        """Hold the norm at its current value while ``A``, ``B`` change (gradient checks)."""
        self._pinned = self.weight_norm(base)
        try:
            yield
        finally:
            self._pinned = None

    @torch.no_grad()
    def weight_norm(self, base: QuantizedLinear) -> torch.Tensor:
        """``||W + s B A||`` per output row, from the base and the current ``A``, ``B`` (no gradient)."""
        if self._pinned is not None:
            return self._pinned
        dt = self._compute_dtype()
        a, b, s = self.lora_A.to(dt), self.lora_B.to(dt), self.scaling
        # Under bf16 autocast the products would be rounded to bf16 (3 digits) before the
        # cancellation-prone sum below: the norm is computed in full precision.
        with torch.autocast(a.device.type, enabled=False):
            wa = base.linear(a).t()  # (out, r) = W A^T: the base's own product, no dense copy kept
            cross = (b * wa).sum(dim=1)
            ba_sq = ((b @ (a @ a.t())) * b).sum(dim=1)
            sq = self.weight_sq.to(dt) + 2 * s * cross + (s * s) * ba_sq
            # Rounding can push an (exactly) zero row a hair below 0; a zero norm would divide by 0.
            return sq.clamp_min(torch.finfo(dt).tiny).sqrt()

    def forward(
        self, x: torch.Tensor, base_out: torch.Tensor, base: QuantizedLinear
    ) -> torch.Tensor:
        scale = self.magnitude / self.weight_norm(base).to(self.magnitude.dtype)
        if self.dropout_active:
            xd = self.dropout(x)
            extra = (scale - 1) * base.linear(xd).to(scale.dtype) + scale * self.lora_update(xd)
            return base_out + extra.to(base_out.dtype)
        return (scale * (base_out.to(scale.dtype) + self.lora_update(x))).to(base_out.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        directed = weight + self.delta_weight().to(weight.dtype)
        norm = torch.linalg.vector_norm(directed.detach(), dim=1)
        return (self.magnitude.to(weight.dtype) / norm)[:, None] * directed

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, magnitude=({self.magnitude.shape[0]},)"


def build(
    *, base: QuantizedLinear, lora: LoRAConfig, config: Any, lora_a: torch.Tensor, lora_b: torch.Tensor
) -> DoRAAdapter:
    # One materialization, at build time only: the row norms of W and the initial magnitude,
    # in float64 where the quantizer materializes it (the float32 fallback costs ~1e-7 relative).
    try:
        weight = base.dequantize(torch.float64)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        weight = base.dequantize(torch.float32)
    return DoRAAdapter(lora, lora_a.to(weight.device), lora_b.to(weight.device), weight)
