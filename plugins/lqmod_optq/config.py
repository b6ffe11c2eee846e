"""The OPTQ config, the allocator's options, and the storage layout they imply."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from lqmod.config import QuantizerConfig
from lqmod.quantize import QuantizationError

__all__ = ["NAME", "OPTQConfig", "group_size_for", "n_groups_for", "options", "stores_g_idx"]

NAME = "optq"
# Only used to suggest alternatives when a group size does not divide in_features.
COMMON_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)


class OPTQConfig(QuantizerConfig):
    """OPTQ / GPTQ (Frantar et al. 2022): Hessian-aware rounding with error feedback.

    ``w = (q - z) * s`` per group of ``group_size`` input columns of a row, with ``z`` fixed
    at ``2**(bits-1)`` when ``sym`` (no zero points stored) and a stored ``bits``-bit integer
    otherwise; ``s`` is stored in float16, or as one byte on a per-matrix log grid
    (``scale_bits=8``, :mod:`lqmod_optq.scale_codes`).
    """

    bits: Literal[2, 3, 4, 8] = Field(default=4, description="bits per weight code")
    group_size: int = Field(
        default=128, description="input columns sharing one scale (and zero point); -1 = the whole row"
    )
    desc_act: bool = Field(
        default=False,
        description="act-order: quantize columns by decreasing Hessian diagonal (GPTQ desc_act); "
        "groups then follow that order and a g_idx maps columns to groups",
    )
    static_groups: bool = Field(
        default=False,
        description="fit every group's scale on the original weights before the sweep, so groups stay "
        "consecutive columns even with desc_act (no g_idx needed)",
    )
    sym: bool = Field(default=True, description="symmetric grid, zero point 2**(bits-1), none stored")
    scale_bits: Literal[16, 8] = Field(
        default=16,
        description="bits per group scale: 16 (float16, GPTQ's) or 8 (a byte on a log grid, 16 levels per "
        "octave below a per-matrix float32 reference; the double quantization of NF's scales, for OPTQ)",
    )
    damp: float = Field(default=0.01, gt=0.0, le=1.0, description="damping, a fraction of the mean Hessian diagonal")
    block_size: int = Field(default=128, ge=1, le=65536, description="lazy-batch width of the column sweep")
    group_fit: Literal["reference", "updated"] = Field(
        default="reference",
        description="fit a group that starts inside a lazy block on the weights as GPTQ's reference code "
        "sees them (earlier blocks' updates only), or on the fully updated weights (block-size independent)",
    )

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError("must be -1 (one group per row) or a positive number of input columns")
        return value


def group_size_for(cfg: OPTQConfig, in_features: int) -> int:
    """Columns per group for a row of ``in_features``, or a QuantizationError naming what fits."""
    group = in_features if cfg.group_size == -1 else cfg.group_size
    if in_features % group:
        fits = [str(g) for g in COMMON_GROUP_SIZES if g <= in_features and in_features % g == 0]
        raise QuantizationError(
            f"in_features={in_features} is not a multiple of group_size={cfg.group_size}; "
            f"group sizes that fit this matrix: {', '.join([*fits, '-1 (the whole row)'])}"
        )
    return group


def n_groups_for(cfg: OPTQConfig, in_features: int) -> int:
    return in_features // group_size_for(cfg, in_features)


def stores_g_idx(cfg: OPTQConfig, in_features: int) -> bool:
    """Whether a g_idx tensor is stored: only act-order with dynamic groups scatters columns.

    Static groups are consecutive columns whatever the order of the sweep, and a single group
    per row maps every column to group 0, so both are described by ``group_size`` alone.
    """
    return cfg.desc_act and not cfg.static_groups and n_groups_for(cfg, in_features) > 1


def options() -> list[OPTQConfig]:
    """What an allocator may choose from: 2/3/4 bits x groups 64/128, symmetric and asymmetric."""
    return [OPTQConfig(bits=b, group_size=g, sym=s) for b in (2, 3, 4) for g in (64, 128) for s in (True, False)]
