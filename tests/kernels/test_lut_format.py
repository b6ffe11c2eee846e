"""LutFormat, its torch reference, and the NF plug-in's description of itself (no triton needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from lut_cases import act_order, int_zero_point, random_table

import lqmod
from lqmod.kernels.formats import LutFormat
from lqmod.kernels.reference import materialize_lut
from lqmod_nf.kernel_format import lut_format as nf_lut_format
from lqmod_nf.quantizer import NFConfig, materialize, quantize


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf_lut_format_is_bit_exact(bits: int, double_quant: bool) -> None:
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(bits))
    qweight = quantize(weight, NFConfig(bits=bits, blocksize=32, double_quant=double_quant))
    fmt = nf_lut_format(qweight)
    assert (fmt.bits, fmt.group_size, fmt.scales.shape) == (bits, 32, (48, 4))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(materialize_lut(fmt, dtype), materialize(qweight, dtype))


def test_nf_spec_declares_lut_format(nf_spec: lqmod.QuantizerSpec) -> None:
    assert nf_spec.lut_format is nf_lut_format


def test_gptq_style_formula() -> None:
    fmt = int_zero_point((4, 8), bits=4, group=4, seed=0)
    codes = materialize_lut(LutFormat((4, 8), 4, fmt.codes, fmt.table, torch.ones(4, 2), 4), torch.float64, exact=True)
    zero_points = -fmt.zeros.double() / fmt.scales.double()
    expected = (codes - zero_points.repeat_interleave(4, dim=1)) * fmt.scales.double().repeat_interleave(4, dim=1)
    assert torch.allclose(materialize_lut(fmt, torch.float64, exact=True), expected)


def test_act_order_groups_follow_g_idx() -> None:
    fmt = act_order((6, 40), bits=4, group=8, seed=1)
    plain = LutFormat(fmt.shape, 4, fmt.codes, fmt.table, torch.ones(6, 1), 40)
    expected = materialize_lut(plain, torch.float64, exact=True) * fmt.scales.double()[:, fmt.g_idx.long()]
    expected += fmt.zeros.double()[:, fmt.g_idx.long()]
    assert torch.allclose(materialize_lut(fmt, torch.float64, exact=True), expected)


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_row_blocks_match_full(bits: int) -> None:
    # 3 and 5 bits with 13 columns: rows start mid-byte.
    fmt = random_table((7, 13), bits=bits, group=5, seed=bits)
    full = materialize_lut(fmt)
    for r0, r1 in [(0, 1), (1, 4), (3, 7), (6, 6)]:
        assert torch.equal(materialize_lut(fmt, rows=(r0, r1)), full[r0:r1])


def test_validation_names_the_problem() -> None:
    fmt = int_zero_point((4, 8), bits=4, group=4, seed=0)
    with pytest.raises(ValueError, match="scales"):
        LutFormat((4, 8), 4, fmt.codes, fmt.table, torch.ones(4, 3), 4)
    with pytest.raises(ValueError, match="table"):
        LutFormat((4, 8), 4, fmt.codes, torch.zeros(8), fmt.scales, 4)
    with pytest.raises(ValueError, match="codes"):
        LutFormat((4, 8), 4, fmt.codes[:3], fmt.table, fmt.scales, 4)
    with pytest.raises(ValueError, match="g_idx"):
        LutFormat((4, 8), 4, fmt.codes, fmt.table, fmt.scales, 4, g_idx=torch.zeros(8, dtype=torch.int64))
    bad = LutFormat((4, 8), 4, fmt.codes, fmt.table, fmt.scales, 4, g_idx=torch.full((8,), 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="g_idx spans"):
        bad.check_values()


def test_import_lqmod_imports_no_triton() -> None:
    code = "import sys, lqmod, lqmod.kernels, lqmod.kernels.triton.backend; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
