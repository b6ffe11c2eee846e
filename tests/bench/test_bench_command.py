"""The ``bench`` subcommand's arguments, and one slow end-to-end run on real MiniLM + WikiText."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lqmod.bench.command import main, register, run_command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lqmod")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_register_adds_bench_with_defaults() -> None:
    args = _parser().parse_args(["bench"])
    assert args.func is run_command
    assert (args.model, args.quantizers, args.baselines, args.finetune_steps, args.seed, args.quick) == (
        "minilm",
        None,
        None,
        0,
        0,
        False,
    )
    args = _parser().parse_args(
        [
            "bench",
            "--model",
            "smollm2",
            "--quantizers",
            "nf:bits=3",
            "--baselines",
            "none",
            "--n-calib",
            "4",
            "--n-eval",
            "2",
            "--finetune-steps",
            "5",
            "--seed",
            "3",
            "--quick",
            "--out",
            "x",
        ]
    )
    assert (args.model, args.n_calib, args.n_eval, args.finetune_steps, args.seed, args.quick) == (
        "smollm2",
        4,
        2,
        5,
        3,
        True,
    )
    assert args.out == Path("x")


def test_bad_spec_fails_before_loading_a_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quantizers", "nf:bits", "--model", "/nonexistent"]) == 2
    assert "expected key=value" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_quick_on_minilm(tmp_path: Path) -> None:
    from lqmod.data import DataNotFoundError, wikitext_sentences
    from lqmod.hf import resolve_model

    try:
        wikitext_sentences()
    except DataNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        resolve_model("minilm")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    argv = ["bench", "--model", "minilm", "--quick", "--finetune-steps", "2", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "bench_minilm.json").read_text())
    rows = {r["label"]: r for r in data["rows"]}
    lq, bnb = rows["nf:bits=4,blocksize=64,double_quant=false"], rows["bnb-nf4:blocksize=64,double_quant=false"]
    assert lq["status"] == bnb["status"] == "ok"
    # Bit-exact NF4: identical numbers end to end.
    for key in ("bits_per_param", "w_err", "out_err"):
        assert lq[key] == bnb[key], key
    assert lq["fidelity"]["value"] == pytest.approx(bnb["fidelity"]["value"], abs=1e-6)
    assert 0.8 < lq["fidelity"]["value"] < 1.0
    assert data["data"]["calib_sentences"] == 32
    runs = data["finetune"]["runs"]
    assert [r["method"] for r in runs] == ["lqmod", "bnb+peft"]
    assert all(r["status"] == "ok" and len(r["loss"]) == 2 for r in runs)
    assert runs[0]["loss"][0] == pytest.approx(runs[1]["loss"][0], rel=1e-4)  # same start point
    for png in ("error_vs_bits", "fidelity", "finetune"):
        assert (tmp_path / f"bench_minilm_{png}.png").stat().st_size > 0
