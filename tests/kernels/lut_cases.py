"""LutFormat test cases and the float64 tolerance rule, shared by the kernel tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lqmod.kernels.formats import LutFormat
from lqmod.kernels.reference import materialize_lut
from lqmod.packing import pack_codes
from lqmod.types import QuantizedWeight

# (case, quantity, kernel error, torch error, bound) rows; conftest prints them at the end.
ERRORS: list[tuple[str, str, float, float, float]] = []

# Relative to the largest reference value: a few float32 ulps (2^-23 = 1.2e-7), a quarter
# of a bfloat16 ulp (2^-8): it only forgives ties, the 2x rule does the work.
ATOL_REL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def check_rule(case: str, what: str, got: torch.Tensor, ref64: torch.Tensor, torch_same: torch.Tensor) -> None:
    """fast-hadamard-transform's rule: |kernel - f64| <= 2 |torch same dtype - f64| + atol."""
    assert got.shape == ref64.shape, f"{case} {what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{case} {what}: non-finite values"
    err = (got.double() - ref64).abs().max().item()
    base = (torch_same.double() - ref64).abs().max().item()
    bound = 2 * base + ATOL_REL[got.dtype] * ref64.abs().max().item()
    ERRORS.append((case, what, err, base, bound))
    assert err <= bound, f"{case} {what}: kernel error {err:.3g} > 2 x torch error {base:.3g} + atol"


# -- cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LutCase:
    """A LutFormat wrapped as a QuantizedWeight, the way a LUT quantizer plug-in would."""

    qweight: QuantizedWeight
    lut_format: Callable[[QuantizedWeight], LutFormat]

    @property
    def fmt(self) -> LutFormat:
        return self.lut_format(self.qweight)

    def materialize(self, qweight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        return materialize_lut(self.lut_format(qweight), dtype)


def wrap(fmt: LutFormat) -> LutCase:
    tensors = {"codes": fmt.codes, "table": fmt.table, "scales": fmt.scales}
    if fmt.zeros is not None:
        tensors["zeros"] = fmt.zeros
    if fmt.g_idx is not None:
        tensors["g_idx"] = fmt.g_idx
    meta = {"bits": fmt.bits, "group_size": fmt.group_size}
    qweight = QuantizedWeight("lut-test", {}, fmt.shape, tensors, meta)

    def lut_format(qw: QuantizedWeight) -> LutFormat:
        t = qw.tensors
        return LutFormat(
            qw.shape, int(qw.meta["bits"]), t["codes"], t["table"], t["scales"],
            int(qw.meta["group_size"]), t.get("zeros"), t.get("g_idx"),
        )  # fmt: skip

    return LutCase(qweight, lut_format)


def int_zero_point(shape: tuple[int, int], bits: int, group: int, seed: int) -> LutFormat:
    """Asymmetric int-k: ``w = (q - z) * s``, i.e. table = arange, offset = -z * s."""
    gen = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    n_groups = -(-in_f // group)
    codes = torch.randint(0, 2**bits, shape, generator=gen)
    scales = torch.rand(out_f, n_groups, generator=gen) * 0.02 + 0.005
    zero_points = torch.randint(0, 2**bits, (out_f, n_groups), generator=gen).float()
    return LutFormat(
        shape, bits, pack_codes(codes, bits), torch.arange(2**bits, dtype=torch.float32),
        scales, group, zeros=-zero_points * scales,
    )  # fmt: skip


def act_order(shape: tuple[int, int], bits: int, group: int, seed: int) -> LutFormat:
    """GPTQ act-order: groups of ``group`` columns in a random column order (g_idx)."""
    base = int_zero_point(shape, bits, group, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    in_f = shape[1]
    g_idx = (torch.arange(in_f) // group)[torch.randperm(in_f, generator=gen)].to(torch.int32)
    return LutFormat(shape, bits, base.codes, base.table, base.scales, group, base.zeros, g_idx)


def random_table(shape: tuple[int, int], bits: int, group: int, seed: int) -> LutFormat:
    """A learned-codebook-like format: arbitrary sorted table, symmetric scales."""
    gen = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    codes = torch.randint(0, 2**bits, shape, generator=gen)
    table = torch.randn(2**bits, generator=gen).sort().values
    scales = torch.rand(out_f, -(-in_f // group), generator=gen) + 0.5
    return LutFormat(shape, bits, pack_codes(codes, bits), table, scales, group)
