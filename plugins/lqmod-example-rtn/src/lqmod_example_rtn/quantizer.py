"""Integer round-to-nearest (RTN): quantize, materialize and the exact storage cost.

Each row of the (out_features, in_features) weight is cut into groups of ``group_size``
consecutive weights (``-1``: one group per row). Each group gets one scale, and in the
asymmetric mode one integer zero point; every weight is rounded to the nearest point of the
group's integer grid.

* asymmetric: ``w ~ (q - z) * s`` with ``q, z`` in ``[0, 2^b - 1]``. The grid spans
  ``[min(w, 0), max(w, 0)]`` (GPTQ's convention): widening the range to include 0 keeps the
  zero point an integer inside the code range, and makes 0 exactly representable.
* symmetric: ``w ~ (q - 2^(b-1)) * s`` with ``s = absmax / (2^(b-1) - 1)``: the grid is
  ``{-(2^(b-1) - 1), ..., 2^(b-1) - 1} * s``, symmetric around an exact 0, so code 0 is
  never used (the price of symmetry; at 2 bits only three levels remain).

Stored tensors (their bytes *are* the storage cost):

* ``codes``:  the ``b``-bit codes of all weights, row-major, packed with
  :func:`lqmod.packing.pack_codes` (one bit stream, ``ceil(out * in * b / 8)`` bytes);
* ``scales``: (out_features, groups_per_row) in ``scale_dtype``;
* ``zeros``:  asymmetric only, the ``b``-bit zero points of ``scales``' groups, packed alike.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from lqmod.config import QuantizerConfig
from lqmod.packing import decode_codes, pack_codes, packed_nbytes
from lqmod.quantize import QuantizationError
from lqmod.types import LayerStats, QuantizedWeight

__all__ = [
    "NAME",
    "RTNConfig",
    "bits_per_param",
    "group_size_for",
    "materialize",
    "options",
    "quantize",
    "storage_bits",
]

NAME = "rtn"
SCALE_BITS = {"float16": 16, "float32": 32}
# Only used to suggest alternatives when a group size does not divide in_features.
COMMON_GROUP_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class RTNConfig(QuantizerConfig):
    """Integer round-to-nearest with one scale (and zero point) per group of a row."""

    # default= by keyword: type checkers read it as the default (dataclass_transform).
    bits: int = Field(default=4, ge=2, le=8, description="bits per weight code")
    group_size: int = Field(
        default=128,
        description="consecutive weights of one row sharing a scale and zero point; -1 = the whole row",
    )
    symmetric: bool = Field(default=False, description="symmetric grid around 0, no zero points stored")
    scale_dtype: Literal["float16", "float32"] = Field(default="float16", description="storage type of the scales")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError("must be -1 (one group per row) or a positive number of weights")
        return value


def group_size_for(cfg: RTNConfig, in_features: int) -> int:
    """The number of weights per group for a row of ``in_features``, or a QuantizationError."""
    group = in_features if cfg.group_size == -1 else cfg.group_size
    if in_features % group:
        fits = [str(g) for g in COMMON_GROUP_SIZES if g <= in_features and in_features % g == 0]
        raise QuantizationError(
            f"in_features={in_features} is not a multiple of group_size={cfg.group_size}; "
            f"group sizes that fit this matrix: {', '.join([*fits, '-1 (the whole row)'])}"
        )
    return group


def quantize(weight: torch.Tensor, cfg: RTNConfig, stats: LayerStats | None = None) -> QuantizedWeight:
    out_f, in_f = weight.shape
    group = group_size_for(cfg, in_f)
    qmax = 2**cfg.bits - 1
    w = weight.float().reshape(out_f, in_f // group, group)
    if cfg.symmetric:
        half = 2 ** (cfg.bits - 1) - 1
        scale = w.abs().amax(dim=-1) / half
    else:
        low = w.amin(dim=-1).clamp(max=0)
        high = w.amax(dim=-1).clamp(min=0)
        scale = (high - low) / qmax
    stored = scale.to(getattr(torch, cfg.scale_dtype))
    if not bool(torch.isfinite(stored).all()):
        raise QuantizationError(
            f"group scales up to {float(scale.max()):.4g} overflow {cfg.scale_dtype}; use scale_dtype='float32'"
        )
    # Codes are computed against the *stored* (rounded) scale, so that materialize, which
    # only sees the stored scale, reproduces exactly the grid the rounding was done on.
    s = stored.float()
    # An all-zero group (or a scale that underflowed float16) has s == 0; dividing by 1
    # instead gives finite codes, and materialize multiplies them by the stored 0 anyway.
    safe = torch.where(s > 0, s, torch.ones_like(s))
    tensors: dict[str, torch.Tensor] = {}
    if cfg.symmetric:
        offset = 2 ** (cfg.bits - 1)
        codes = torch.clamp(torch.round(w / safe.unsqueeze(-1)), -half, half) + offset
    else:
        zeros = torch.clamp(torch.round(-low / safe), 0, qmax)
        codes = torch.clamp(torch.round(w / safe.unsqueeze(-1)) + zeros.unsqueeze(-1), 0, qmax)
        tensors["zeros"] = pack_codes(zeros.to(torch.uint8), cfg.bits)
    tensors["codes"] = pack_codes(codes.to(torch.uint8), cfg.bits)
    tensors["scales"] = stored.contiguous()
    return QuantizedWeight(NAME, cfg.model_dump(), (out_f, in_f), tensors, dtype=weight.dtype)


def materialize(qweight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    # Reads the config dict directly: this runs in every forward and backward, and the
    # config was validated when the weight was quantized.
    cfg = qweight.config
    bits = int(cfg["bits"])
    out_f, in_f = qweight.shape
    group = in_f if int(cfg["group_size"]) == -1 else int(cfg["group_size"])
    n_groups = in_f // group
    t = qweight.tensors
    # float32 math is exact for float16 scales (11-bit mantissa x 8-bit integer); float64 is
    # used only when asked for, so a float64 result is not a rounded float32 one.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    # Codes decoded straight to floats through a byte table (lqmod.packing.decode_codes):
    # q - z of small integers is exact in float, so this is the integer (q - z) * s exactly.
    levels = torch.arange(2**bits, dtype=work, device=t["codes"].device)
    codes = decode_codes(t["codes"], bits, out_f * in_f, levels).view(out_f, n_groups, group)
    if cfg["symmetric"]:
        q = codes.sub_(2 ** (bits - 1))
    else:
        q = codes.sub_(decode_codes(t["zeros"], bits, out_f * n_groups, levels).view(out_f, n_groups, 1))
    dense = q.mul_(t["scales"].to(work).unsqueeze(-1))
    return dense.reshape(out_f, in_f).to(dtype)


def storage_bits(cfg: RTNConfig, shape: tuple[int, int]) -> int:
    """Bits :func:`quantize` stores for a weight of ``shape`` (raises if the group size does not fit)."""
    out_f, in_f = shape
    groups = out_f * (in_f // group_size_for(cfg, in_f))
    bits = packed_nbytes(out_f * in_f, cfg.bits) * 8 + groups * SCALE_BITS[cfg.scale_dtype]
    if not cfg.symmetric:
        bits += packed_nbytes(groups, cfg.bits) * 8
    return bits


def bits_per_param(cfg: RTNConfig, shape: tuple[int, int]) -> float:
    # Same integer numerator and denominator as QuantizedWeight.bits_per_param(): the two
    # floats are equal, not merely close.
    return storage_bits(cfg, shape) / (shape[0] * shape[1])


def options() -> list[RTNConfig]:
    """What an allocator may choose from: asymmetric, float16 scales, 2..8 bits x 3 group sizes."""
    return [RTNConfig(bits=b, group_size=g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)]
