"""How the low-rank factors L1 (out, r) and L2 (r, in) are stored, and what that costs.

* ``bf16`` / ``fp16`` / ``fp32``: the factors as they are, in that dtype (``l1``, ``l2``).
* ``int8``: symmetric 8-bit codes with one float32 absmax scale per rank component (a column
  of L1, a row of L2): ``l1``, ``l1_scale`` (r,), ``l2``, ``l2_scale`` (r,). A component's
  entries share a magnitude (they are one singular vector times sqrt(sigma)), so one scale
  per component loses little, and it halves the factors' cost against bf16, which decides
  whether the low-rank part pays for itself on small matrices (see README.md).

:func:`decode` is the only way back to float32, used both by the decomposition (so Q is
fitted to the factors as they will be stored) and by ``materialize``.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["FACTOR_KINDS", "FactorKind", "decode", "encode", "factor_bits", "round_trip"]

FactorKind = Literal["bf16", "fp16", "fp32", "int8"]
FACTOR_KINDS: tuple[FactorKind, ...] = ("bf16", "fp16", "fp32", "int8")
_FLOAT: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _int8(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=dim) / 127.0
    # An all-zero component has scale 0; dividing by 1 keeps its codes 0 (and finite).
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(dim)
    codes = torch.clamp(torch.round(x / safe), -127, 127).to(torch.int8)
    return codes, scale.float()


def encode(l1: torch.Tensor, l2: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """The stored tensors of float factors ``l1`` (out, r) and ``l2`` (r, in)."""
    if kind in _FLOAT:
        return {"l1": l1.to(_FLOAT[kind]).contiguous(), "l2": l2.to(_FLOAT[kind]).contiguous()}
    if kind == "int8":
        c1, s1 = _int8(l1.float(), 0)
        c2, s2 = _int8(l2.float(), 1)
        return {"l1": c1.contiguous(), "l1_scale": s1, "l2": c2.contiguous(), "l2_scale": s2}
    raise ValueError(f"unknown factor storage {kind!r}; choose one of {FACTOR_KINDS}")


def decode(tensors: dict[str, torch.Tensor], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``(l1, l2)`` from the stored tensors (fresh tensors, never views of them)."""
    if kind == "int8":
        l1 = tensors["l1"].float() * tensors["l1_scale"].float().unsqueeze(0)
        l2 = tensors["l2"].float() * tensors["l2_scale"].float().unsqueeze(1)
        return l1, l2
    return tensors["l1"].float().clone(), tensors["l2"].float().clone()


def round_trip(l1: torch.Tensor, l2: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors as storage will return them."""
    return decode(encode(l1, l2, kind), kind)


def factor_bits(kind: str, shape: tuple[int, int], rank: int) -> int:
    """Bits the stored factors of a rank-``rank`` decomposition of a ``shape`` matrix take."""
    entries = (shape[0] + shape[1]) * rank
    if kind in _FLOAT:
        return entries * torch.finfo(_FLOAT[kind]).bits
    if kind == "int8":
        return entries * 8 + 2 * rank * 32
    raise ValueError(f"unknown factor storage {kind!r}; choose one of {FACTOR_KINDS}")
