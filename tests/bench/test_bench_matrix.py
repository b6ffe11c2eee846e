"""The row-spec parser and the default matrices."""

from __future__ import annotations

import pytest

from lqmod.bench.matrix import (
    RowSpec,
    SpecError,
    default_baselines,
    default_rows,
    format_spec,
    parse_spec,
    parse_specs,
    parse_value,
)


def test_parse_spec_reads_typed_values() -> None:
    row = parse_spec("nf:bits=4,blocksize=64,double_quant=false")
    assert row == RowSpec("lqmod", "nf", {"bits": 4, "blocksize": 64, "double_quant": False})
    assert row.label == "nf:bits=4,blocksize=64,double_quant=false"


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("False", False), ("3", 3), ("-2", -2), ("0.5", 0.5), ("none", None), ("float16", "float16")],
)
def test_parse_value(text: str, value: object) -> None:
    assert parse_value(text) == value
    assert type(parse_value(text)) is type(value)


def test_parse_specs_splits_on_semicolons_and_ignores_blanks() -> None:
    rows = parse_specs(" nf:bits=4,blocksize=64 ; ;rtn:bits=4 ;hqq:bits=3,group_size=64")
    assert [(r.kind, r.name) for r in rows] == [("lqmod", "nf"), ("lqmod", "rtn"), ("baseline", "hqq")]
    assert rows[1].config == {"bits": 4}
    assert parse_specs(None) == [] and parse_specs("") == []


def test_bare_name_and_forced_kind() -> None:
    assert parse_spec("rtn") == RowSpec("lqmod", "rtn", {})
    assert parse_spec("gptq", "lqmod").kind == "lqmod"  # a plug-in may reuse a baseline's name


def test_lora_and_init_keys_are_separated() -> None:
    row = parse_spec("nf:bits=3,lora.initializer=loftq,lora.r=16,init.iters=2")
    assert row.config == {"bits": 3}
    assert row.lora == {"initializer": "loftq", "r": 16}
    assert row.init == {"iters": 2}
    assert parse_spec(format_spec(row)) == row


@pytest.mark.parametrize("text", ["", ":bits=4", "nf:bits", "nf:=4", "nf:bits=4,bits=3", "a=b", "hqq:lora.r=4"])
def test_malformed_specs_are_rejected_with_the_spec_quoted(text: str) -> None:
    with pytest.raises(SpecError, match="spec"):
        parse_spec(text)


def test_default_rows_sweep_other_registered_quantizers() -> None:
    fields = {"nf": ["bits", "blocksize"], "foo": ["bits", "group_size", "symmetric"], "bar": ["mode"]}
    labels = [r.label for r in default_rows("encoder", fields)]
    assert "nf:bits=4,blocksize=64,double_quant=false" in labels
    assert {"foo:bits=4,group_size=64", "foo:bits=3,group_size=64", "foo:bits=2,group_size=64", "bar"} <= set(labels)
    assert all(r.kind == "lqmod" for r in default_rows("encoder", fields))


def test_default_rows_without_nf_registered() -> None:
    rows = default_rows("encoder", {"rtn": ["bits"]}, quick=True)
    assert [r.label for r in rows] == ["rtn:bits=4"]


def test_causal_defaults_avoid_block_32_at_4_bits() -> None:
    # SmolLM2's GGUF weights lie on a 4-bit grid with blocks of 32: such rows flatter a method.
    rows = default_rows("causal-lm", {"nf": ["bits", "blocksize"]}) + default_baselines("causal-lm")
    for r in rows:
        block = r.config.get("blocksize", r.config.get("group_size", 64))
        assert r.config.get("bits", 4) < 4 or block >= 64, r.label
    assert {r.config["bits"] for r in rows if r.name == "nf"} == {2, 3, 4}


def test_default_baselines_are_known_baselines() -> None:
    from lqmod.bench.baselines import BASELINES

    for quick in (False, True):
        for kind in ("encoder", "causal-lm"):
            assert all(r.kind == "baseline" and r.name in BASELINES for r in default_baselines(kind, quick=quick))
