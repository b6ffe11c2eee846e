"""The causal-LM finetuning benchmark harness end to end on a tiny random Llama.

Quick settings, a word-level tokenizer and text files instead of the corpora, so the test
needs neither SmolLM2 nor shared/data.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from lqmod.bench import finetune_lm as fl

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

ROW_KEYS = {
    "row", "status", "fingerprint", "spec", "bits_per_param", "quantized_params", "trainable_params",
    "resident_bytes", "ppl_before", "ppl_after", "eval", "loss", "train_tokens", "tokens_per_s",
    "peak_rss_delta_bytes", "build", "seconds", "notes", "lqmod_version",
}  # fmt: skip


@pytest.fixture
def tiny_setup(
    tmp_path: Path, tiny_llama: LlamaForCausalLM, word_tokenizer: PreTrainedTokenizerFast, train_text: str
) -> fl.LMBenchSettings:
    model_dir = tmp_path / "tiny"
    tiny_llama.save_pretrained(model_dir)
    word_tokenizer.save_pretrained(model_dir)
    texts = {}
    # Three different files: training text, held-out text, calibration text.
    for name, reps in (("train", 2), ("eval", 3), ("calib", 1)):
        path = tmp_path / f"{name}.txt"
        path.write_text(train_text * reps + "\n")
        texts[name] = str(path)
    return fl.replace(
        fl.QUICK, model=str(model_dir), train_text=texts["train"], eval_text=texts["eval"], calib_text=texts["calib"]
    )


def _run(settings: fl.LMBenchSettings, out: Path, cache: Path, rows: str, logs: list[str]) -> fl.BenchRun:
    return fl.run_benchmark(settings, out, rows=fl.select_rows(rows), cache=cache, progress=False, log=logs.append)


@pytest.mark.slow
def test_harness_end_to_end_resumable(tiny_setup: fl.LMBenchSettings, tmp_path: Path) -> None:
    out, cache = tmp_path / "results", tmp_path / "cache"
    rows = "nf3,optq3+lq-lora,fp-lora"
    logs: list[str] = []
    first = _run(tiny_setup, out, cache, rows, logs)
    assert first.failed == [], logs
    assert first.computed == ["nf3", "fp-lora", "optq3+lq-lora"]
    # Result JSON schema: every computed row, with finite numbers.
    res = json.loads((out / "finetune_lm.json").read_text())
    assert res["benchmark"] == "finetune_lm" and res["partial"] is True
    assert res["settings"]["name"] == "quick" and res["settings_fingerprint"] == tiny_setup.fingerprint()
    assert {r["row"] for r in res["rows"]} == set(first.computed)
    assert "nf4" in res["missing"] and "nf3" not in res["missing"]
    by = {r["row"]: r for r in res["rows"]}
    for r in res["rows"]:
        assert set(r) >= ROW_KEYS, ROW_KEYS - set(r)
        assert r["status"] == "ok"
        assert len(r["loss"]) == tiny_setup.steps
        assert r["train_tokens"] == tiny_setup.steps * tiny_setup.micro_batch * tiny_setup.seq_len
        assert r["eval"]["before"]["tokens"] == r["eval"]["after"]["tokens"] > 0
        for key in ("ppl_before", "ppl_after", "tokens_per_s", "bits_per_param"):
            assert isinstance(r[key], float) and r[key] > 0, (r["row"], key)
        assert r["trainable_params"] > 0
    # NF3 with double-quantized blocks of 64: 3 bits of codes + 8-bit scales per 64 + ...
    assert 3.1 < by["nf3"]["bits_per_param"] < 3.2
    assert by["fp-lora"]["bits_per_param"] == 32.0
    assert 3.0 < by["optq3+lq-lora"]["bits_per_param"] < 3.6
    # Default init: the step-0 model is the quantized base (B = 0), so LoRA changes nothing yet;
    # lq-lora starts from Q + L1 L2, a different function from the plain OPTQ base.
    assert by["nf3"]["ppl_before"] != by["optq3+lq-lora"]["ppl_before"]
    # The held-out text repeats the training text: a few steps must lower its perplexity.
    for r in res["rows"]:
        assert r["ppl_after"] < r["ppl_before"], r["row"]
    # The markdown and the plots.
    md = (out / "finetune_lm.md").read_text()
    assert "PARTIAL" in md and "| nf3 | default |" in md and "| optq3+lq-lora | lq-lora |" in md
    for name in ("ppl_vs_bits.png", "loss_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Quantized checkpoints and statistics were cached.
    assert len(list((cache / "checkpoints").iterdir())) == 2
    assert any((cache / "stats").iterdir())

    # A rerun computes nothing: every row file is reused, untouched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "rows").iterdir()}
    second = _run(tiny_setup, out, cache, rows, logs)
    assert second.computed == [] and second.failed == []
    assert sorted(second.reused) == sorted(first.computed)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "rows").iterdir()} == mtimes

    # Another setting changes the fingerprints: the row is recomputed, from the cached checkpoint
    # (the quantized model does not depend on the training steps).
    third = _run(fl.replace(tiny_setup, steps=2), out, cache, "nf3", logs)
    assert third.computed == ["nf3"]
    row = json.loads((out / "rows" / "nf3.json").read_text())
    assert row["build"]["cached"] is True and len(row["loss"]) == 2
    assert by["nf3"]["ppl_before"] == pytest.approx(row["ppl_before"], rel=1e-6)
    stale = fl.aggregate(tiny_setup, out)["stale"]
    assert stale == ["nf3"]


@pytest.mark.slow
def test_plan_and_bnb_rows(tiny_setup: fl.LMBenchSettings, tmp_path: Path, tiny_llama: torch.nn.Module) -> None:
    pytest.importorskip("scipy")
    logs: list[str] = []
    run = _run(tiny_setup, tmp_path / "r", tmp_path / "c", "plan2.75,plan2.75-kfac,bnb-nf4", logs)
    res = {r["row"]: r for r in run.results["rows"]}
    for name, measure in (("plan2.75", "output"), ("plan2.75-kfac", "kfac")):
        plan = res[name]
        assert plan["status"] == "ok", logs
        info = plan["build"]["plan"]
        assert info["error_measure"] == measure
        assert info["achieved_bits_per_param"] <= 2.75 + 1e-9
        assert plan["bits_per_param"] == pytest.approx(info["achieved_bits_per_param"], rel=1e-6)
        assert set(info["by_quantizer"]) <= {"nf", "optq"}
    bnb = res["bnb-nf4"]
    if bnb["status"] != "ok":
        pytest.skip(f"bitsandbytes baseline unavailable: {bnb.get('reason')}")
    # NF4, blocks of 64, double quant: 4 bits + an 8-bit absmax per 64, a float32 scale per 256
    # blocks (one here: the tiny matrices have fewer blocks) and a float32 offset per matrix.
    from lqmod.config import TargetConfig
    from lqmod.model import find_targets

    sizes = [tiny_llama.get_parameter(f"{n}.weight").numel() for n in find_targets(tiny_llama, TargetConfig())]
    expected = sum(n * (4 + 8 / 64) + 32 * -(-n // (64 * 256)) + 32 for n in sizes) / sum(sizes)
    assert bnb["bits_per_param"] == pytest.approx(expected, rel=1e-9)


def test_select_rows_and_bad_names() -> None:
    assert [r.name for r in fl.select_rows("nf3,fp-lora")] == ["nf3", "fp-lora"]
    assert {r.name for r in fl.select_rows("quip*")} == {"quip3", "quip2", "quip3+lq-lora", "quip2+lq-lora"}
    with pytest.raises(ValueError, match="matches no row; rows: "):
        fl.select_rows("nf5")
    assert len(fl.ROWS) == 27 and len({r.name for r in fl.ROWS}) == 27
    assert len(fl.select_rows("all")) == 27
    assert {r.name for r in fl.select_rows(None)} == set(fl.DEFAULT_ROWS)


def _cli() -> Any:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_finetune_lm.py"
    spec = importlib.util.spec_from_file_location("bench_finetune_lm", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_report_only_and_bad_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = _cli()
    assert cli.main(["--rows", "nf5", "--out", str(tmp_path)]) == 2
    assert "matches no row" in capsys.readouterr().err
    # Nothing to compute: the summary files are written from (no) row files, no model is loaded.
    assert cli.main(["--report-only", "--steps", "3", "--out", str(tmp_path), "--no-plots"]) == 0
    res = json.loads((tmp_path / "finetune_lm.json").read_text())
    assert res["rows"] == [] and res["partial"] is True and len(res["missing"]) == 27
    assert res["settings"]["steps"] == 3 and res["settings"]["name"] == "full, custom"
    assert "Settings: `FULL` with steps=3." in (tmp_path / "finetune_lm.md").read_text()
