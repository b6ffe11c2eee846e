"""``lqmod bench adapters``: argument parsing, bad input refused before any model loads, and smoke runs
on tiny random models (an encoder and a causal LM)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from lqmod.bench.command import main, register, run_command
from lqmod.bench.modes import adapters as adapters_mode


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lqmod")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_plain_bench_is_still_the_matrix_and_modes_dispatch() -> None:
    args = _parser().parse_args(["bench", "--quick"])
    assert args.func is run_command and args.bench_mode is None
    args = _parser().parse_args(["bench", "adapters", "--model", "smollm2", "--steps", "3", "--adapters", "lora,dora",
                                 "--bases", "nf:bits=3", "--rank", "4", "--out", "x"])  # fmt: skip
    assert args.func is adapters_mode.run
    assert (args.model, args.steps, args.adapters, args.bases, args.rank, args.out) == (
        "smollm2", 3, "lora,dora", "nf:bits=3", 4, Path("x"))  # fmt: skip
    defaults = _parser().parse_args(["bench", "adapters"])
    assert (defaults.model, defaults.steps, defaults.bases, defaults.adapters) == ("minilm", None, None, None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--adapters", "lora,nosuch"], "unknown variant(s) ['nosuch']; registered:"),
        (["--adapters", "lora,lora"], "names a variant twice"),
        (["--bases", "nosuch:bits=3"], "'nosuch' is not a registered quantizer; registered:"),
        (["--bases", "nf:bits"], "expected key=value"),
        (["--bases", "nf:bits=3,lora.r=4"], "lora./init. keys do not apply here"),
        (["--steps", "0"], "--steps 0: must be a positive integer"),
        (["--rank", "-1"], "--rank -1: must be a positive integer"),
        (["--lr", "0"], "--lr 0.0: must be a positive number"),
    ],
)
def test_bad_input_is_one_line_before_loading(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "adapters", "--model", "/nonexistent", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_model_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "adapters", "--model", "/nonexistent/model", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("lqmod bench adapters: ")


def _check_results(data: dict[str, Any], variants: list[str]) -> None:
    assert data["variants"] == variants and data["complete"]
    for base in data["bases"]:
        rows = base["variants"]
        assert list(rows) == variants
        for name, row in rows.items():
            assert len(row["loss"]) == data["settings"]["steps"], name
            assert row["trainable_params"] > 0 and row["train_cpu_s"] > 0
            # All variants start from the same function (their defaults keep it).
            assert row["step0_max_output_diff"] < 1e-4, name
        lora = rows[variants[0]]
        # The same batches and seed: the first loss is the same for every variant.
        assert all(r["loss"][0] == pytest.approx(lora["loss"][0], rel=1e-4) for r in rows.values())


def test_smoke_encoder(tiny_bert_dir: Path, wikitext: None, tmp_path: Path) -> None:
    argv = ["bench", "adapters", "--model", str(tiny_bert_dir), "--bases", "nf:bits=3,blocksize=64",
            "--steps", "2", "--batch", "4", "--n-calib", "8", "--n-eval", "8", "--no-progress", "--out", str(tmp_path),
            "--name", "a"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "a.json").read_text())
    from lqmod.bench.adapters import select_variants

    _check_results(data, select_variants(None))
    assert data["metric"] == "cosine" and data["model"]["kind"] == "encoder"
    assert "layer_timing" in data["bases"][0]
    assert (tmp_path / "a.png").stat().st_size > 0
    assert "| nf:bits=3,blocksize=64 |" in (tmp_path / "a.md").read_text()


def test_smoke_causal_lm_with_a_calibrated_base(tiny_llama_dir: Path, wikitext: None, tmp_path: Path) -> None:
    argv = ["bench", "adapters", "--model", str(tiny_llama_dir), "--bases", "optq:bits=3,group_size=32",
            "--adapters", "lora,dora", "--steps", "2", "--batch", "2", "--seq-len", "32", "--n-calib", "2",
            "--eval-tokens", "96", "--eval-context", "32", "--no-layer-timing", "--no-progress",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    (path,) = tmp_path.glob("adapters_*.json")
    data = json.loads(path.read_text())
    _check_results(data, ["lora", "dora"])
    assert data["metric"] == "perplexity" and data["bases"][0]["metric_before"] > 1
