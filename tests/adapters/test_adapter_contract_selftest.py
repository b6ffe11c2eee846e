"""The adapter contract itself: each check fails for a variant that breaks what it checks.

The broken variants are LoRA with one thing changed; the contract's test methods are called
directly with explicit arguments.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

import lqmod
from lqmod.config import AdapterConfig
from lqmod.nn.quantized_linear import QuantizedLinear
from lqmod.testing import AdapterContract
from lqmod.types import AdapterSpec
from lqmod_lora_default.adapter import LoRAAdapter


class _Contract(AdapterContract):  # not collected: the name does not start with "Test"
    adapter = "lora"

    def __init__(self, spec: AdapterSpec) -> None:
        self._spec = spec

    def get_spec(self) -> AdapterSpec:
        return self._spec


def _variant(cls: type[LoRAAdapter]) -> AdapterSpec:
    lora = lqmod.get_registry().adapter("lora")

    def build(*, base: QuantizedLinear, lora: Any, config: Any, lora_a: torch.Tensor, lora_b: torch.Tensor) -> Any:
        return cls(lora, lora_a, lora_b)

    return dataclasses.replace(lora, build=build, config_model=AdapterConfig)


class _SavesDense(LoRAAdapter):
    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: QuantizedLinear) -> torch.Tensor:
        # x @ (W + sBA)^T: autograd keeps the (out, in) sum for the gradient of x.
        w = base.dequantize(self.lora_A.dtype) + self.delta_weight()
        return torch.nn.functional.linear(self.dropout(x).to(w.dtype), w).to(base_out.dtype)


class _WrongMerge(LoRAAdapter):
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + 2 * self.delta_weight().to(weight.dtype)


class _DropsGradient(LoRAAdapter):
    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: QuantizedLinear) -> torch.Tensor:
        h = torch.nn.functional.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A.detach())
        return base_out + (torch.nn.functional.linear(h, self.lora_B) * self.scaling).to(base_out.dtype)


class _NotIdentityAtZero(LoRAAdapter):
    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: QuantizedLinear) -> torch.Tensor:
        return 1.01 * base_out + self.lora_update(self.dropout(x)).to(base_out.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return 1.01 * weight + self.delta_weight().to(weight.dtype)


def test_the_real_lora_passes(tmp_path: Path) -> None:
    c = _Contract(lqmod.get_registry().adapter("lora"))
    spec = c.get_spec()
    c.test_no_dense_weight_is_saved_for_backward(spec, {}, 0.0)
    c.test_forward_and_gradients_match_merged_weight_in_float64(spec, {})
    c.test_gradcheck_in_float64(spec, {})
    c.test_step_zero_with_zero_b_equals_the_base(spec, {})


def test_saving_the_dense_weight_fails() -> None:
    c = _Contract(_variant(_SavesDense))
    c.test_forward_and_gradients_match_merged_weight_in_float64(c.get_spec(), {})  # values are right
    with pytest.raises(AssertionError, match="saved for backward"):
        c.test_no_dense_weight_is_saved_for_backward(c.get_spec(), {}, 0.0)


def test_a_merged_weight_that_disagrees_fails() -> None:
    c = _Contract(_variant(_WrongMerge))
    with pytest.raises(AssertionError, match="merged_weight"):
        c.test_forward_and_gradients_match_merged_weight_in_float64(c.get_spec(), {})


def test_a_dropped_gradient_fails() -> None:
    c = _Contract(_variant(_DropsGradient))
    with pytest.raises((AssertionError, GradcheckError)):
        c.test_gradcheck_in_float64(c.get_spec(), {})
    with pytest.raises(AssertionError):
        c.test_forward_and_gradients_match_merged_weight_in_float64(c.get_spec(), {})


def test_not_starting_as_the_base_fails() -> None:
    c = _Contract(_variant(_NotIdentityAtZero))
    with pytest.raises(AssertionError):
        c.test_step_zero_with_zero_b_equals_the_base(c.get_spec(), {})
