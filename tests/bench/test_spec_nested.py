"""Dotted keys in ``name:key=value`` specs fill nested configs (a wrapper quantizer's base)."""

from __future__ import annotations

import pytest

from lqmod.bench.matrix import SpecError, format_spec, parse_spec


def test_dotted_keys_build_a_nested_config_and_round_trip() -> None:
    row = parse_spec("icq:base=nf,base_config.bits=3,base_config.blocksize=64,tau_n=12,lora.r=8")
    assert row.config == {"base": "nf", "base_config": {"bits": 3, "blocksize": 64}, "tau_n": 12}
    assert row.lora == {"r": 8}
    assert parse_spec(format_spec(row)) == row


def test_nested_spec_validates_through_the_wrapper_config() -> None:
    from lqmod.config import validate_config
    from lqmod.plugins import get_registry

    reg = get_registry()
    if "icq" not in reg.quantizers():
        pytest.skip("icq plug-in not installed")
    row = parse_spec("icq:base=nf,base_config.bits=3,base_config.blocksize=64,base_config.double_quant=true")
    cfg = validate_config(reg.quantizer("icq").config_model, row.config, what="icq")
    assert cfg.base_config["bits"] == 3 and cfg.base_config["double_quant"] is True


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("icq:base_config=3,base_config.bits=3", "both a value and a nested config"),
        ("icq:base_config..bits=3", "empty part"),
        ("icq:base_config.bits=3,base_config.bits=4", "given twice"),
    ],
)
def test_bad_dotted_keys_are_refused_with_the_reason(spec: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(spec)
