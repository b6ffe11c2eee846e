"""The example third-party plug-in (lqmod-example-rtn): the contract suite plus RTN's own checks."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

import lqmod
from lqmod.config import ConfigError, QuantizerConfig
from lqmod.packing import unpack_codes
from lqmod.testing import QuantizerContract, relative_error
from lqmod.types import QuantizerSpec
from lqmod_example_rtn import RTNConfig


class TestRTNContract(QuantizerContract):
    quantizer = "rtn"
    configs: ClassVar[list[dict[str, Any]]] = [
        {"bits": 4, "group_size": 64},
        {"bits": 2, "group_size": 32},
        {"bits": 3, "group_size": 128},
        {"bits": 8, "group_size": -1},
        {"bits": 5, "group_size": 64, "scale_dtype": "float32"},
        {"bits": 4, "group_size": 64, "symmetric": True},
        {"bits": 2, "group_size": -1, "symmetric": True},
        {"bits": 7, "group_size": 32, "symmetric": True, "scale_dtype": "float32"},
    ]

    def relative_error_bound(self, config: QuantizerConfig) -> float:
        # The step is range / (levels - 1), so error x (levels - 1) is about constant: on the
        # Gaussian test weight (seeds 0-2) at most 1.64 asymmetric and 0.89 symmetric, for
        # groups of 32 up to whole 256-wide rows. ~20% headroom.
        assert isinstance(config, RTNConfig)
        if config.symmetric:
            return 1.1 / (2 ** (config.bits - 1) - 1)
        return 2.0 / (2**config.bits - 1)


@pytest.fixture
def rtn() -> QuantizerSpec:
    return lqmod.get_registry().quantizer("rtn")


def gaussian(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_found_through_its_entry_point() -> None:
    registry = lqmod.get_registry(reload=True)
    assert "rtn" in registry.quantizers()
    assert registry.origin("lqmod_quantizers", "rtn") == "lqmod-example-rtn"


def test_known_values_asymmetric_2bit(rtn: QuantizerSpec) -> None:
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, 0.0, 0.5, 2.0]])
    qw = lqmod.quantize_weight(rtn, w, {"bits": 2, "group_size": -1})
    # Row 0: range [0, 3] -> scale 1, zero 0, codes 0 1 2 3.
    # Row 1: range [-1, 2] -> scale 1, zero 1, codes 0 1 1 3 (0.5 rounds half to even: 0).
    assert qw.tensors["scales"].dtype == torch.float16
    assert qw.tensors["scales"].tolist() == [[1.0], [1.0]]
    # One MSB-first bit stream: 00 01 10 11 | 00 01 01 11.
    assert qw.tensors["codes"].tolist() == [0b00011011, 0b00010111]
    assert qw.tensors["zeros"].tolist() == [0b00010000]  # zero points 0, 1 and padding
    expected = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, 0.0, 0.0, 2.0]])
    assert torch.equal(rtn.materialize(qw, torch.float32), expected)
    # 8 codes x 2 bits + 2 scales x 16 bits + 2 zero points x 2 bits -> 1 byte.
    assert qw.storage_bits() == 16 + 32 + 8


def test_known_values_symmetric_3bit(rtn: QuantizerSpec) -> None:
    w = torch.tensor([[-3.0, -1.5, 0.0, 3.0, 0.4, -0.6, 2.5, 1.0]])
    qw = lqmod.quantize_weight(rtn, w, {"bits": 3, "group_size": 4, "symmetric": True})
    # Group 0: absmax 3 / (2^2 - 1) -> scale 1; group 1: absmax 2.5 / 3.
    assert "zeros" not in qw.tensors
    scales = qw.tensors["scales"]
    assert scales.tolist() == [[1.0, torch.tensor(2.5 / 3, dtype=torch.float16).item()]]
    # Offset-binary codes q + 4; -1.5 rounds half to even (-2).
    codes = unpack_codes(qw.tensors["codes"], 3, 8)
    assert codes[:4].tolist() == [1, 2, 4, 7]
    dense = rtn.materialize(qw, torch.float32)
    assert dense[0, :4].tolist() == [-3.0, -2.0, 0.0, 3.0]
    s = float(scales[0, 1])
    assert dense[0, 4:].tolist() == [0.0, -s, 3 * s, s]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_within_half_a_step(rtn: QuantizerSpec, bits: int, symmetric: bool) -> None:
    # Round-to-nearest on a grid covering the group never errs by more than half a step
    # (float32 scales, so the stored step is the exact one).
    w = gaussian((16, 128), seed=bits)
    qw = lqmod.quantize_weight(
        rtn, w, {"bits": bits, "group_size": 32, "symmetric": symmetric, "scale_dtype": "float32"}
    )
    err = (rtn.materialize(qw, torch.float32) - w).abs().view(16, 4, 32)
    half_step = qw.tensors["scales"].unsqueeze(-1) / 2
    assert bool((err <= half_step * (1 + 1e-5)).all())


def test_8bit_asymmetric_error_is_tiny(rtn: QuantizerSpec) -> None:
    w = gaussian((64, 256))
    qw = lqmod.quantize_weight(rtn, w, {"bits": 8, "group_size": 64})
    assert relative_error(rtn.materialize(qw, torch.float32), w) < 0.006


def test_zeros_stay_exactly_zero(rtn: QuantizerSpec) -> None:
    w = gaussian((8, 64))
    w[:, ::3] = 0.0
    w[5] = 0.0  # an all-zero row: scale 0 must not turn into NaN
    for symmetric in (False, True):
        config = {"bits": 3, "symmetric": symmetric, "group_size": 32}
        dense = rtn.materialize(lqmod.quantize_weight(rtn, w, config), torch.float32)
        assert bool(torch.isfinite(dense).all())
        assert bool((dense[w == 0] == 0).all())


def test_whole_row_group_equals_explicit_row_width(rtn: QuantizerSpec) -> None:
    w = gaussian((8, 64))
    a = lqmod.quantize_weight(rtn, w, {"bits": 4, "group_size": -1})
    b = lqmod.quantize_weight(rtn, w, {"bits": 4, "group_size": 64})
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert a.tensors["scales"].shape == (8, 1)


def test_storage_accounting_by_hand(rtn: QuantizerSpec) -> None:
    cfg = RTNConfig(bits=3, group_size=32)
    # 256 codes x 3 bits = 96 bytes; 8 groups: 8 float16 scales and 8 3-bit zeros (3 bytes).
    assert rtn.bits_per_param(cfg, (4, 64)) == (96 * 8 + 8 * 16 + 3 * 8) / 256
    sym32 = RTNConfig(bits=3, group_size=32, symmetric=True, scale_dtype="float32")
    assert rtn.bits_per_param(sym32, (4, 64)) == (96 * 8 + 8 * 32) / 256
    qw = lqmod.quantize_weight(rtn, gaussian((4, 64)), cfg)
    assert qw.storage_bits() == 96 * 8 + 8 * 16 + 3 * 8


def test_group_size_that_does_not_fit_lists_the_ones_that_do(rtn: QuantizerSpec) -> None:
    w = gaussian((4, 96))
    expected = r"in_features=96 is not a multiple of group_size=64; group sizes that fit this matrix: 8, 16, 32, -1"
    with pytest.raises(lqmod.QuantizationError, match=expected):
        lqmod.quantize_weight(rtn, w, {"group_size": 64})
    with pytest.raises(lqmod.QuantizationError, match=expected):
        rtn.bits_per_param(RTNConfig(group_size=64), (4, 96))
    with pytest.raises(lqmod.QuantizationError, match="group_size=128"):
        lqmod.quantize_weight(rtn, gaussian((4, 64)), {"group_size": 128})  # larger than the row


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"bits": 9}, "bits"),
        ({"bits": 1}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -2}, "group_size"),
        ({"scale_dtype": "bfloat16"}, "scale_dtype"),
        ({"groupsize": 64}, "groupsize"),
    ],
)
def test_bad_config_is_rejected_naming_the_field(rtn: QuantizerSpec, config: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        lqmod.quantize_weight(rtn, gaussian((4, 64)), config)


def test_float16_scale_overflow_is_refused(rtn: QuantizerSpec) -> None:
    w = gaussian((4, 64)) * 1e9
    with pytest.raises(lqmod.QuantizationError, match="scale_dtype='float32'"):
        lqmod.quantize_weight(rtn, w, {"bits": 2, "group_size": 32})
    qw = lqmod.quantize_weight(rtn, w, {"bits": 8, "group_size": 32, "scale_dtype": "float32"})
    assert relative_error(rtn.materialize(qw, torch.float32), w) < 0.01


def test_options_span_bits_and_group_sizes(rtn: QuantizerSpec) -> None:
    opts = [o for o in rtn.options() if isinstance(o, RTNConfig)]
    assert len(opts) == len(list(rtn.options())) == 18
    assert {o.bits for o in opts} == {2, 3, 4, 5, 6, 8}
    assert {o.group_size for o in opts} == {32, 64, 128}
    costs = [rtn.bits_per_param(o, (4096, 4096)) for o in opts]
    assert len(set(costs)) == len(costs)  # distinct costs: every option is a real choice


@pytest.mark.parametrize("symmetric", [False, True])
def test_lut_format_is_bit_exact_with_float16_scales(rtn: QuantizerSpec, symmetric: bool) -> None:
    # (q - z) * s and q * s + (-z * s) round identically when s has 11 significant bits.
    from lqmod.kernels.reference import materialize_lut

    assert rtn.lut_format is not None
    qw = lqmod.quantize_weight(rtn, gaussian((16, 96)), {"bits": 3, "group_size": 32, "symmetric": symmetric})
    fmt = rtn.lut_format(qw)
    assert fmt is not None
    assert (fmt.zeros is None) == symmetric
    assert torch.equal(materialize_lut(fmt, torch.float32), rtn.materialize(qw, torch.float32))
