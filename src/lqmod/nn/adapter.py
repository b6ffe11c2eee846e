"""The trainable half of an adapted layer: the base class every adapter variant subclasses.

An adapted layer (:class:`lqmod.nn.lora_linear.LoRALinear`) is a frozen
:class:`~lqmod.nn.quantized_linear.QuantizedLinear` plus one :class:`Adapter`. The layer
computes the base output ``x W^T`` (materialized in forward and again in backward, never
saved) and hands it to the adapter, which returns the adapted output; the bias is added
after, so variants that rescale the base output (DoRA) see it without the bias.

Every variant keeps LoRA's ``lora_A`` (r, in) and ``lora_B`` (out, r): initializers produce
them, and the variants differ in what they add around them. Variants are registered
through the ``lqmod_adapters`` hook (:class:`lqmod.types.AdapterSpec`); the core never names one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from lqmod.config import LoRAConfig

if TYPE_CHECKING:
    from lqmod.nn.quantized_linear import QuantizedLinear

__all__ = ["Adapter", "check_finite_state"]


class Adapter(nn.Module):
    """``lora_A``, ``lora_B``, the scaling ``alpha / r`` and the input dropout, shared by all variants.

    Subclasses implement :meth:`forward` and :meth:`merged_weight`, and must keep the two
    consistent: with dropout off, ``forward(x, x @ W.T, base) == x @ merged_weight(W).T`` in
    value *and* in every parameter's gradient (the contract suite checks both).
    """

    #: Parameters some term of the forward deliberately passes no gradient through (DoRA's
    #: detached norm depends on A and B): a numerical gradient check of them only holds
    #: inside :meth:`pinned_detached`.
    detached_params: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, lora: LoRAConfig, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        super().__init__()
        self.r = lora.r
        self.scaling = lora.scaling
        self.lora_A = nn.Parameter(lora_a.detach().clone())
        self.lora_B = nn.Parameter(lora_b.detach().clone())
        self.dropout: nn.Module = nn.Dropout(lora.dropout) if lora.dropout > 0 else nn.Identity()

    @property
    def dropout_active(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout) and self.dropout.p > 0

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """``(alpha / r) B A x`` on ``x`` as given (dropout is the caller's), in the adapter's dtype."""
        h = torch.nn.functional.linear(x.to(self.lora_A.dtype), self.lora_A)
        return torch.nn.functional.linear(h, self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A``, differentiable in both."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @contextlib.contextmanager
    def pinned_detached(self, base: QuantizedLinear) -> Iterator[None]:
        """Hold every detached quantity at its current value (for gradient checks); none here."""
        yield

    def forward(
        self, x: torch.Tensor, base_out: torch.Tensor, base: QuantizedLinear
    ) -> torch.Tensor:
        """The adapted output without the bias, given ``base_out = x W^T`` (no bias)."""
        raise NotImplementedError

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The dense (out, in) weight this adapter over base ``weight`` computes with (dropout
        off), differentiable in the adapter's parameters exactly as :meth:`forward` is."""
        raise NotImplementedError


def check_finite_state(adapter: nn.Module) -> None:
    """Raise ``ValueError`` naming the first adapter tensor holding inf or NaN (a damaged or
    diverged checkpoint), the check every variant's ``validate`` starts from."""
    for name, t in adapter.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"adapter tensor {name!r} {tuple(t.shape)} holds non-finite values")
