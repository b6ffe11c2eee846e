"""``lqmod bench init``: spec parsing, the default matrix as data, bad input refused before any model
loads, and a smoke run on tiny random models (rows cached, a report from the cache alone)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lqmod.bench.command import main, register
from lqmod.bench.init_bench import _chain_configs, default_matrix, parse_labelled, rows_from_specs
from lqmod.bench.matrix import SpecError
from lqmod.bench.modes import init as init_mode
from lqmod.bench.step0 import Row


def test_parse_labelled_specs() -> None:
    (a, b) = parse_labelled("default; exact=quailora:method=exact,damp=0.1", "initializer")
    assert (a.label, a.name, a.config) == ("default", "default", {})
    assert (b.label, b.name, b.config) == ("exact", "quailora", {"method": "exact", "damp": 0.1})
    for bad in ("=x", "a:b", "a b", ""):
        with pytest.raises(SpecError):
            parse_labelled(bad, "base")


def test_rows_cross_bases_and_inits_and_keys_are_stable() -> None:
    rows = rows_from_specs("nf4=nf:bits=4;nf3=nf:bits=3", "default;quailora:method=exact")
    assert [r.label for r in rows] == ["fp", "nf4 default", "nf4 quailora", "nf3 default", "nf3 quailora"]
    settings = {"model": "m", "rank": 16}
    # The key hashes the row and the settings: identical rows share it, any change moves it.
    assert rows[1].key(settings, "s") == Row("nf", {"bits": 4}, "default", {}, "nf4 default").key(settings, "s")
    assert rows[1].key(settings, "s") != rows[1].key({**settings, "rank": 8}, "s")
    assert rows[1].key(settings, "s") != rows[3].key(settings, "s")


def test_chain_config_routing() -> None:
    row = Row("nf", {}, "lq-lora+quailora", {"max_iters": 3, "quailora.method": "exact"})
    assert _chain_configs(row) == [("lq-lora", {"max_iters": 3}), ("quailora", {"method": "exact"})]


def test_default_matrix_is_data_filtered_by_the_registry() -> None:
    labels = [r.label for r in default_matrix("encoder")]
    assert labels[0] == "fp" and "nf4 quailora-exact" in labels and "nf3 lq-lora+quailora" in labels
    assert len(labels) == len(set(labels))
    lm = [r.label for r in default_matrix("causal-lm")]
    assert lm == ["fp", "nf4 default", "nf4 lq-lora", "nf4 quailora", "nf4 quailora-exact", "nf3 default",
                  "nf3 quailora", "nf3 lq-lora", "optq3 default", "optq3 quailora", "optq3 lq-lora", "quip3 default",
                  "quip3 quailora", "quip3 lq-lora", "quip2 default", "quip2 quailora"]  # fmt: skip


def test_parsing_dispatches_to_the_mode() -> None:
    parser = argparse.ArgumentParser(prog="lqmod")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "init", "--model", "smollm2", "--rows", "nf4", "--rank", "8", "--report-only"])
    assert args.func is init_mode.run
    assert (args.model, args.rows, args.rank, args.report_only, args.bases) == ("smollm2", "nf4", 8, True, None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bases", "nf:bits=4"], "give both --bases and --inits"),
        (["--bases", "nf:bits=4", "--inits", "nosuch"], "initializer 'nosuch' (in 'nosuch') is not registered"),
        (["--bases", "nosuch:bits=4", "--inits", "default"], "base 'nosuch' is not a registered quantizer"),
        (["--bases", "nf:bits=4;nf:bits=4,blocksize=128", "--inits", "default"], "two rows labelled 'nf default'"),
        (["--bases", "nf:bits=4", "--inits", "default+default"], "names a member twice"),
        (["--bases", "nf:bits", "--inits", "default"], "expected key=value"),
        (["--rank", "0"], "--rank 0: must be a positive integer"),
        (["--alpha", "-1"], "--alpha -1.0: must be a positive number"),
    ],
)
def test_bad_input_is_one_line_before_loading(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "init", "--model", "/nonexistent", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_report_only_without_a_cache_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "init", "--model", "minilm", "--report-only", "--cache", str(tmp_path), "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "no cached run in" in capsys.readouterr().err


def test_smoke_encoder_rows_cached(tiny_bert_dir: Path, wikitext: None, tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = ["bench", "init", "--model", str(tiny_bert_dir), "--bases", "nf3=nf:bits=3,blocksize=64",
            "--inits", "default;lq-lora:max_iters=2;quailora:method=exact;both=lq-lora+quailora:max_iters=2,"
            "quailora.method=exact", "--rank", "4", "--alpha", "8", "--n-calib", "16", "--n-eval", "16",
            "--cache", str(cache), "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    name = tiny_bert_dir.name
    data = json.loads((out / f"init_{name}.json").read_text())
    rows = {r["label"]: r for r in data["rows"]}
    assert list(rows) == ["fp", "nf3 default", "nf3 lq-lora", "nf3 quailora", "nf3 both"]
    assert all(r.get("status") != "missing" for r in rows.values())
    default, quai = rows["nf3 default"]["layers"], rows["nf3 quailora"]["layers"]
    assert len(default) == 12  # 2 blocks x (q, k, v, attention out, intermediate, output)
    # The calibrated-optimal correction lowers the calibrated output error on every layer.
    assert all(q["out_err"] < d["out_err"] for q, d in zip(quai, default, strict=True))
    claims = data["claims"]["nf3"]
    assert claims["quailora"]["vs_default_layers_below"] == 12
    assert "vs_lq_lora_layers_below" in claims["quailora"]
    assert (out / f"init_{name}.png").stat().st_size > 0
    # Cached: a second run measures nothing new, and the report alone reads the same rows.
    files = {p.name: p.stat().st_mtime_ns for p in (cache / f"{name}-init").glob("*.json")}
    assert main([*argv, "--report-only"]) == 0
    again = json.loads((out / f"init_{name}.json").read_text())
    assert [r["summary"] for r in again["rows"]] == [r["summary"] for r in data["rows"]]
    assert {p.name: p.stat().st_mtime_ns for p in (cache / f"{name}-init").glob("*.json")} == files


def test_smoke_causal_lm(tiny_llama_dir: Path, wikitext: None, tmp_path: Path) -> None:
    argv = ["bench", "init", "--model", str(tiny_llama_dir), "--bases", "nf4=nf:bits=4,blocksize=64",
            "--inits", "default;quailora:method=exact", "--rank", "4", "--n-calib", "2", "--ctx", "32",
            "--ppl-tokens", "96", "--cache", str(tmp_path), "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / f"init_{tiny_llama_dir.name}.json").read_text())
    assert data["settings"]["kind"] == "causal-lm"
    entry = data["claims"]["nf4"]["quailora"]
    assert entry["ppl_gap_closed"] is not None and entry["vs_default_layers_below"] == entry["n_layers"]
