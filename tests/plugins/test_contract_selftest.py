"""The contract suite itself: each check fails for a quantizer that breaks what it checks.

The broken quantizers are the example RTN one with one callable swapped out; the contract's
test methods are called directly with explicit arguments.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ConfigDict

import lqmod
from lqmod.config import LoRAConfig, QuantizerConfig
from lqmod.testing import QuantizerContract, dense_sized_saved_tensors
from lqmod.types import LayerStats, QuantizedWeight, QuantizerSpec
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
def cfg(rtn: QuantizerSpec) -> QuantizerConfig:
    return RTNConfig(bits=4, group_size=64)


def quantized(spec: QuantizerSpec, cfg: QuantizerConfig, contract: RTNContract) -> QuantizedWeight:
    return lqmod.quantize_weight(spec, contract.make_weight(), cfg)


def test_the_real_quantizer_passes(contract: RTNContract, rtn: QuantizerSpec, cfg: QuantizerConfig,
                                   tmp_path: Path) -> None:  # fmt: skip
    # The baseline for every test below: unbroken, the same calls pass.
    qw = quantized(rtn, cfg, contract)
    contract.test_spec_is_well_formed(rtn)
    contract.test_config_is_frozen_and_forbids_extras(rtn, cfg)
    contract.test_quantize_returns_quantized_weight(rtn, cfg, contract.make_weight())
    contract.test_bits_per_param_is_exact(rtn, cfg, qw)
    contract.test_materialize_is_deterministic_and_pure(rtn, qw, torch.float32)
    contract.test_materialize_shape_and_dtype(rtn, qw, torch.bfloat16)
    contract.test_error_does_not_increase_with_bits(rtn, cfg, contract.make_weight())
    contract.test_safetensors_round_trip(rtn, qw, tmp_path)
    contract.test_options_validate(rtn)
    contract.test_options_bits_per_param_is_exact(rtn)


def test_wrong_name_fails(contract: RTNContract, rtn: QuantizerSpec) -> None:
    with pytest.raises(AssertionError):
        contract.test_spec_is_well_formed(dataclasses.replace(rtn, name="other"))


def test_unknown_needs_fail(contract: RTNContract, rtn: QuantizerSpec) -> None:
    with pytest.raises(AssertionError, match="hesian"):
        contract.test_spec_is_well_formed(dataclasses.replace(rtn, needs=frozenset({"hesian"})))


def test_mutable_config_with_extras_fails(contract: RTNContract, rtn: QuantizerSpec) -> None:
    class LooseConfig(RTNConfig):
        model_config = ConfigDict(frozen=False, extra="allow")

    loose = dataclasses.replace(rtn, config_model=LooseConfig)
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        contract.test_config_is_frozen_and_forbids_extras(loose, LooseConfig(bits=4, group_size=64))


def test_off_by_one_bits_per_param_fails(contract: RTNContract, rtn: QuantizerSpec, cfg: QuantizerConfig) -> None:
    def sloppy(config: Any, shape: tuple[int, int]) -> float:
        return float(rtn.bits_per_param(config, shape)) + 1 / (shape[0] * shape[1])  # one bit too many

    broken = dataclasses.replace(rtn, bits_per_param=sloppy)
    with pytest.raises(AssertionError, match=r"spec\.bits_per_param says"):
        contract.test_bits_per_param_is_exact(broken, cfg, quantized(broken, cfg, contract))
    with pytest.raises(AssertionError, match="predicted"):
        contract.test_options_bits_per_param_is_exact(broken)


def test_nondeterministic_materialize_fails(contract: RTNContract, rtn: QuantizerSpec, cfg: QuantizerConfig) -> None:
    def noisy(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        dense = rtn.materialize(qw, torch.float32)
        return (dense + torch.randn_like(dense) * 1e-6).to(dtype)

    broken = dataclasses.replace(rtn, materialize=noisy)
    with pytest.raises(AssertionError, match="not deterministic"):
        contract.test_materialize_is_deterministic_and_pure(broken, quantized(broken, cfg, contract), torch.float32)


def test_materialize_returning_stored_tensor_fails(contract: RTNContract, rtn: QuantizerSpec,
                                                   cfg: QuantizerConfig) -> None:  # fmt: skip
    def keep_dense(w: torch.Tensor, config: Any, stats: Any) -> QuantizedWeight:
        return QuantizedWeight("rtn", config.model_dump(), (w.shape[0], w.shape[1]), {"w": w.float().clone()})

    def view(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        return qw.tensors["w"].to(dtype)  # no copy when dtype is float32

    broken = dataclasses.replace(rtn, quantize=keep_dense, materialize=view)
    with pytest.raises(AssertionError, match="view of stored tensor"):
        contract.test_materialize_is_deterministic_and_pure(broken, quantized(broken, cfg, contract), torch.float32)


def test_materialize_ignoring_dtype_fails(contract: RTNContract, rtn: QuantizerSpec, cfg: QuantizerConfig) -> None:
    def always_float32(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        return rtn.materialize(qw, torch.float32)

    broken = dataclasses.replace(rtn, materialize=always_float32)
    with pytest.raises(AssertionError):
        contract.test_materialize_shape_and_dtype(broken, quantized(broken, cfg, contract), torch.float16)


def test_quantize_writing_into_its_input_fails(contract: RTNContract, rtn: QuantizerSpec,
                                               cfg: QuantizerConfig) -> None:  # fmt: skip
    def clipping(w: torch.Tensor, config: Any, stats: Any) -> QuantizedWeight:
        return rtn.quantize(w.clamp_(-0.01, 0.01), config, stats)

    broken = dataclasses.replace(rtn, quantize=clipping)
    with pytest.raises(AssertionError, match="modified its input"):
        contract.test_quantize_returns_quantized_weight(broken, cfg, contract.make_weight())


def test_error_growing_with_bits_fails(contract: RTNContract, rtn: QuantizerSpec, cfg: QuantizerConfig) -> None:
    def upside_down(w: torch.Tensor, config: Any, stats: Any) -> QuantizedWeight:
        qw = rtn.quantize(w, config.model_copy(update={"bits": 10 - config.bits}), stats)
        return dataclasses.replace(qw, config=config.model_dump() | {"materialize_bits": 10 - config.bits})

    def materialize(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        config = {k: v for k, v in qw.config.items() if k != "materialize_bits"}
        return rtn.materialize(dataclasses.replace(qw, config=config | {"bits": qw.config["materialize_bits"]}), dtype)

    broken = dataclasses.replace(rtn, quantize=upside_down, materialize=materialize)
    with pytest.raises(AssertionError, match="error rose"):
        contract.test_error_does_not_increase_with_bits(broken, cfg, contract.make_weight())


def test_error_above_bound_fails(rtn: QuantizerSpec, cfg: QuantizerConfig) -> None:
    class Strict(RTNContract):
        max_relative_error = 0.01  # 4-bit RTN is at about 0.09

    contract = Strict()
    weight = contract.make_weight()
    with pytest.raises(AssertionError, match="relative error"):
        contract.test_relative_error_below_bound(rtn, cfg, weight, lqmod.quantize_weight(rtn, weight, cfg))


def test_options_of_another_type_fail(contract: RTNContract, rtn: QuantizerSpec) -> None:
    class Other(QuantizerConfig):
        bits: int = 4

    broken = dataclasses.replace(rtn, options=lambda: [Other()])
    with pytest.raises(AssertionError, match="is not a RTNConfig"):
        contract.test_options_validate(broken)
    duplicated = dataclasses.replace(rtn, options=lambda: [cfg := RTNConfig(), cfg])
    with pytest.raises(AssertionError, match="listed twice"):
        contract.test_options_validate(duplicated)


def test_lut_format_disagreeing_with_materialize_fails(contract: RTNContract, rtn: QuantizerSpec,
                                                      cfg: QuantizerConfig) -> None:  # fmt: skip
    assert rtn.lut_format is not None
    real = rtn.lut_format

    def shifted(qw: QuantizedWeight) -> Any:
        fmt = real(qw)
        assert fmt is not None
        assert fmt.zeros is not None
        return dataclasses.replace(fmt, zeros=fmt.zeros + 1e-4)  # a kernel would be off by 1e-4

    broken = dataclasses.replace(rtn, lut_format=shifted)
    contract.test_lut_format_matches_materialize(rtn, quantized(rtn, cfg, contract))
    with pytest.raises(AssertionError, match="disagrees with materialize"):
        contract.test_lut_format_matches_materialize(broken, quantized(broken, cfg, contract))


def test_saved_tensor_check_catches_a_saved_dense_weight(rtn: QuantizerSpec, cfg: QuantizerConfig) -> None:
    # materialize_in_backward=False is the QLoRA-style path that keeps the dense weight for
    # autograd: exactly what the contract's LoRA check must notice.
    shape = (48, 256)
    qw = lqmod.quantize_weight(rtn, torch.randn(shape), cfg)
    found = {}
    for in_backward in (True, False):
        lora = LoRAConfig.model_validate({"r": 4, "materialize_in_backward": in_backward})
        layer = lqmod.LoRALinear(qw, rtn, lora, lora_a=torch.randn(4, 256), lora_b=torch.zeros(48, 4))
        _, found[in_backward] = dense_sized_saved_tensors(layer, torch.randn(6, 256, requires_grad=True), shape)
    assert found[True] == []
    # F.linear saves the transposed weight: counting elements, not matching shapes, catches it.
    assert ((256, 48), torch.float32) in found[False]


def test_a_third_party_test_file_collects_and_passes(tmp_path: Path) -> None:
    # End to end, as a plug-in author would use it: a subclass in a fresh test file, run by
    # a separate pytest process. Every config-taking test runs once per config.
    (tmp_path / "test_mine.py").write_text(
        textwrap.dedent(
            """
            from lqmod.testing import QuantizerContract

            class TestMine(QuantizerContract):
                quantizer = "rtn"
                configs = ({"bits": 8}, {"bits": 3, "symmetric": True})
                shape = (16, 128)

            class TestUnset(QuantizerContract):
                pass
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         "test_mine.py::TestMine"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout
    assert "failed" not in result.stdout
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir",
         str(tmp_path), "test_mine.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    out = collected.stdout
    assert "test_mine.py::TestMine::test_relative_error_below_bound[bits=3,symmetric=True]" in out
    assert "test_mine.py::TestMine::test_materialize_shape_and_dtype[bits=8-bfloat16]" in out
    # A subclass that forgot `quantizer` is a collection error, not a silent pass.
    assert "TestUnset must set `quantizer`" in out + collected.stderr


def test_statistics_factory_feeds_quantizers_that_need_them(rtn: QuantizerSpec, cfg: QuantizerConfig) -> None:
    needy = dataclasses.replace(rtn, needs=frozenset({"hessian"}))

    class NeedyContract(RTNContract):
        def get_spec(self) -> QuantizerSpec:
            return needy

        def stats(self, weight: torch.Tensor) -> LayerStats | None:
            return LayerStats(hessian=torch.eye(weight.shape[1], dtype=torch.float64), n_tokens=1)

    contract = NeedyContract()
    weight = contract.make_weight()
    contract.test_missing_statistics_are_refused(needy)  # runs (no skip) and passes
    contract.test_error_does_not_increase_with_bits(needy, cfg, weight)
    contract.test_options_bits_per_param_is_exact(needy)
    # Without the factory the same checks cannot even quantize.
    with pytest.raises(lqmod.QuantizationError, match=r"needs calibration statistics \['hessian'\]"):
        RTNContract().test_options_bits_per_param_is_exact(needy)
