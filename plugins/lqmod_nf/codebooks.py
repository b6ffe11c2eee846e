"""NormalFloat code tables and the 8-bit dynamic map used for double quantization.

NF-k (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1), asymmetric so that zero is exact,
normalised to [-1, 1]. The 4-bit table is the published one (what bitsandbytes hard-codes);
other widths come from the same construction.
"""

from __future__ import annotations

from functools import cache

import torch

NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def normal_float_table(bits: int) -> torch.Tensor:
    """The construction: 2^(k-1) positive and 2^(k-1)-1 negative quantiles, plus an exact zero.

    The outermost quantile sits at ``offset``, halfway between the last probability bins of
    the two halves (QLoRA's 0.9677 for k=4), so the extremes are not at infinity.
    """
    if not 1 < bits <= 8:
        raise ValueError(f"NormalFloat tables exist for 2..8 bits, not {bits}")
    n_pos, n_neg = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    offset = 1.0 - 0.5 * (1.0 / (2 * (2**bits)) + 1.0 / (2 * (2**bits) - 2))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n_pos + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n_neg + 1, dtype=torch.float64)[:-1])
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return values / values.abs().max()


@cache
def _table(bits: int) -> torch.Tensor:
    if bits == 4:
        return torch.tensor(NF4_TABLE, dtype=torch.float32)
    return normal_float_table(bits).to(torch.float32)


def nf_table(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The float32 NF table for ``bits``, sorted ascending, on ``device``."""
    return _table(bits).to(device)


@cache
def _dynamic_map() -> torch.Tensor:
    # Signed dynamic-exponent 8-bit map (Dettmers 2015, as used for bitsandbytes' 8-bit
    # blockwise quantization): for exponent e = 0..6 the fraction has 2^e + 1 boundaries on
    # [0.1, 1]; values are the midpoints scaled by 10^(e-6), with both signs; then 0 and 1.
    values: list[float] = []
    max_exp = 7
    for e in range(max_exp):
        boundaries = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exp - 1) + e)
        # The product is rounded in float32, as in the reference map.
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(values, dtype=torch.float32).sort().values


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic map, sorted ascending."""
    return _dynamic_map().to(device)


def nearest_code(scaled: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table value (ties go to the lower value), by midpoint search."""
    midpoints = (table[:-1] + table[1:]) / 2
    return torch.bucketize(scaled, midpoints)
