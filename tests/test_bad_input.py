"""Bad input is refused with a message naming what is wrong and what is accepted."""

from __future__ import annotations

import pytest
import torch

import lqmod
from lqmod.config import ConfigError


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(nf_spec: lqmod.QuantizerSpec, bad: float) -> None:
    w = torch.randn(8, 64)
    w[3, 5] = bad
    with pytest.raises(lqmod.QuantizationError, match=r"1 non-finite value.*index \(3, 5\)"):
        lqmod.quantize_weight(nf_spec, w, {"blocksize": 32})


def test_non_matrix_and_integer_weights_are_refused(nf_spec: lqmod.QuantizerSpec) -> None:
    with pytest.raises(lqmod.QuantizationError, match="2-D"):
        lqmod.quantize_weight(nf_spec, torch.randn(64), {})
    with pytest.raises(lqmod.QuantizationError, match="floating-point"):
        lqmod.quantize_weight(nf_spec, torch.ones(8, 64, dtype=torch.int32), {})


@pytest.mark.parametrize(
    ("config", "field", "accepted"),
    [
        ({"bits": 5}, "bits", "2, 3 or 4"),
        ({"blocksize": 100}, "blocksize", "64"),
        ({"double_quant": "maybe"}, "double_quant", "boolean"),
        ({"blocksze": 64}, "blocksze", "Extra inputs are not permitted"),
    ],
)
def test_invalid_config_names_field_and_accepted_values(
    nf_spec: lqmod.QuantizerSpec, config: dict[str, object], field: str, accepted: str
) -> None:
    with pytest.raises(ConfigError) as info:
        lqmod.quantize_weight(nf_spec, torch.randn(8, 64), config)
    assert f"field '{field}'" in str(info.value) and accepted in str(info.value)


def test_lora_config_errors() -> None:
    with pytest.raises(ConfigError, match="field 'r' = 0"):
        lqmod.config.validate_config(lqmod.LoRAConfig, {"r": 0}, what="lora")
    with pytest.raises(ConfigError, match="field 'dropout'"):
        lqmod.config.validate_config(lqmod.LoRAConfig, {"dropout": 1.5}, what="lora")


def test_bad_target_regex() -> None:
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        lqmod.config.validate_config(lqmod.TargetConfig, {"include": ["("]}, what="targets")


def test_unknown_quantizer_lists_choices(registry: lqmod.Registry) -> None:
    with pytest.raises(lqmod.UnknownPluginError, match=r"unknown quantizer 'nf5'\. Choose one of: .*nf"):
        registry.quantizer("nf5")
