"""``lqmod bench icq``: rows, bad input refused before any model loads, and smoke runs on tiny
random models (an encoder and a causal LM), including a report rebuilt from the row cache."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from lqmod.bench.icq import IcqBenchSettings, default_rows, rows_for_bases, select_rows, wrapped
from lqmod.bench.matrix import SpecError, parse_specs
from lqmod.bench.modes import icq as icq_mode


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lqmod bench")
    icq_mode.register(parser.add_subparsers(dest="bench_mode"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_rows_pair_each_base_with_the_wrapper_and_the_equal_bits_half_block() -> None:
    rows = rows_for_bases(parse_specs("nf:bits=3,blocksize=64;rtn:bits=4,group_size=32,symmetric=true", "lqmod"),
                          "icq", 5)  # fmt: skip
    assert [r.label for r in rows] == ["fp", "nf3 b64", "icq-nf3 b64", "nf3 b32", "rtn4s b32", "icq-rtn4s b32",
                                       "rtn4s b16"]  # fmt: skip
    assert rows[2].base_config == {"base_config": {"bits": 3, "blocksize": 64}, "tau_n": 5}
    assert wrapped(rows[5]) == ("rtn", {"bits": 4, "group_size": 32, "symmetric": True})
    assert wrapped(rows[1]) is None
    # The committed row sets: MiniLM pairs block 128 with 64, SmolLM2 block 64 with 32.
    enc = [r.label for r in default_rows("encoder")]
    assert enc[:5] == ["fp", "nf3 b64", "icq-nf3 b64", "nf3 b128", "icq-nf3 b128"]
    lm = default_rows("causal-lm")
    assert {r.label for r in lm} >= {"icq-nf3 b64", "nf3 b32", "icq-rtn3s b64"}
    assert all(r.base_config["tau_n"] == 4 for r in lm if wrapped(r))


def test_bits_of_the_wrapper_equal_plain_nf_at_half_the_block() -> None:
    import lqmod

    reg = lqmod.get_registry()
    icq, nf = reg.quantizer("icq"), reg.quantizer("nf")
    # Exactly where the block count is a multiple of 256 (the second-level groups); else the
    # wrapper's two partial groups (absmax and shift scales) vs plain NF's one differ by 32 bits.
    for shape, slack in [((512, 1536), 0), ((576, 576), 32), ((1536, 576), 0)]:
        n = shape[0] * shape[1]
        for bits in (2, 3, 4):
            w_cfg = icq.config_model.model_validate({"base_config": {"bits": bits, "blocksize": 64}})
            plain = nf.bits_per_param(nf.config_model.model_validate({"bits": bits, "blocksize": 32}), shape)
            assert round((icq.bits_per_param(w_cfg, shape) - plain) * n) == slack, (shape, bits)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bases", "nosuch:bits=3"], "'nosuch' is not a registered quantizer; registered:"),
        (["--bases", "nf:bits"], "expected key=value"),
        (["--bases", "nf:bits=9"], "row 'nf9'"),
        (["--bases", "optq:bits=3"], "needs statistics"),
        (["--wrapper", "nosuch"], "--wrapper 'nosuch' is not a registered quantizer"),
        (["--tau-n", "0"], "--tau-n 0: must be a positive integer"),
        (["--ppl-tokens", "-3"], "--ppl-tokens -3: must be a positive integer"),
    ],
)
def test_bad_input_is_one_line_before_loading(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(["icq", "--model", "/nonexistent", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_missing_model_and_empty_report_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["icq", "--model", "/nonexistent/model", "--no-progress", "--cache", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("lqmod bench icq: ")
    assert _run(["icq", "--model", "minilm", "--report-only", "--cache", str(tmp_path)]) == 2
    assert "--report-only: no cached run" in capsys.readouterr().err


def test_smoke_encoder_and_report_from_the_cache(tiny_bert_dir: Path, wikitext: None, tmp_path: Path) -> None:
    common = ["icq", "--model", str(tiny_bert_dir), "--bases", "nf:bits=3,blocksize=64", "--tau-n", "2",
              "--n-calib", "8", "--n-eval", "8", "--no-progress", "--cache", str(tmp_path / "c"),
              "--out", str(tmp_path), "--name", "t"]  # fmt: skip
    assert _run(common) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    rows = {r["label"]: r for r in data["rows"]}
    assert list(rows) == ["fp", "nf3 b64", "icq-nf3 b64", "nf3 b32"]
    assert data["settings"]["kind"] == "encoder" and rows["fp"]["fidelity"]["value"] == pytest.approx(1.0)
    w = rows["icq-nf3 b64"]
    assert w["entropy_violations"] == 0 and w["blocks"] > 0 and 0 <= w["shifted_blocks"] <= w["blocks"]
    assert w["summary"]["entropy"] >= rows["nf3 b64"]["summary"]["entropy"]
    # The wrapper at block 64 stores the bits of plain NF at block 32, up to the partial
    # second-level groups (32 bits each) of these tiny matrices.
    for a, b in zip(w["layers"], rows["nf3 b32"]["layers"], strict=True):
        n = a["shape"][0] * a["shape"][1]
        groups = 2 * math.ceil(n / 64 / 256) - math.ceil(n / 32 / 256)
        assert round((a["bits_per_param"] - b["bits_per_param"]) * n) == 32 * groups
    assert "icq-nf3 b64 vs nf3 b32" in data["claims"] and "icq-nf3 b64 vs nf3 b64" in data["claims"]
    assert (tmp_path / "t.png").stat().st_size > 0 and "| icq-nf3 b64 |" in (tmp_path / "t.md").read_text()
    # The report again, from the cached rows only.
    (tmp_path / "t.json").unlink()
    assert _run([*common, "--report-only"]) == 0
    again = json.loads((tmp_path / "t.json").read_text())
    assert [r["summary"] for r in again["rows"]] == [r["summary"] for r in data["rows"]]


def test_smoke_causal_lm_with_an_integer_base(tiny_llama_dir: Path, wikitext: None, tmp_path: Path) -> None:
    argv = ["icq", "--model", str(tiny_llama_dir), "--bases", "rtn:bits=3,group_size=32,symmetric=true",
            "--tau-n", "2", "--n-calib", "2", "--ctx", "32", "--ppl-tokens", "96", "--no-progress",
            "--cache", str(tmp_path / "c"), "--out", str(tmp_path), "--name", "lm"]  # fmt: skip
    assert _run(argv) == 0
    data = json.loads((tmp_path / "lm.json").read_text())
    rows = {r["label"]: r for r in data["rows"]}
    assert list(rows) == ["fp", "rtn3s b32", "icq-rtn3s b32", "rtn3s b16"]
    assert all(r["fidelity"]["metric"] == "perplexity" and r["fidelity"]["value"] > 1 for r in rows.values())
    assert rows["icq-rtn3s b32"]["entropy_violations"] == 0


def test_rows_filter_that_matches_nothing_is_refused_and_exact_labels() -> None:
    with pytest.raises(SpecError, match="matches no row"):
        select_rows(IcqBenchSettings(rows="nosuch"), "encoder")
    with pytest.raises(SpecError, match="matches no row"):
        select_rows(IcqBenchSettings(rows="=nf3"), "encoder")
    from lqmod.bench.icq import _matches

    assert _matches("nf3 b64", "icq-nf3 b64") and not _matches("=nf3 b64", "icq-nf3 b64")
    assert _matches("x,=nf3 b64", "nf3 b64")
