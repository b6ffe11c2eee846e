"""Report writing: JSON schema, Markdown with every row (failed ones too), PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lqmod.bench.report import markdown_tables, quant_table, write_report
from lqmod.bench.run import SCHEMA

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(label: str, kind: str, bits: float, err: float, cos: float) -> dict[str, Any]:
    name, _, _ = label.partition(":")
    return {
        "label": label,
        "kind": kind,
        "name": name,
        "config": {"bits": 4, "blocksize": 64},
        "notes": [],
        "source": "pkg 1.0",
        "status": "ok",
        "bits_per_param": bits,
        "w_err": err,
        "out_err": err / 2,
        "out_err_max": err,
        "n_layers": 1.0,
        "numel": 64.0,
        "seconds": 1.0,
        "fidelity": {"metric": "cosine", "value": cos, "min": cos - 0.01},
        "layers": [
            {
                "name": "l0",
                "shape": [8, 8],
                "numel": 64,
                "storage_bits": int(bits * 64),
                "bits_per_param": bits,
                "w_err": err,
                "out_err": err / 2,
            }
        ],
    }


@pytest.fixture
def results() -> dict[str, Any]:
    run = {
        "method": "lqmod",
        "base": "NF4 b64",
        "steps": 3,
        "loss": [0.3, 0.2, 0.1],
        "status": "ok",
        "fidelity_before": 0.97,
        "fidelity_after": 0.98,
        "saved_for_backward_bytes": 2**20,
        "peak_rss_delta_bytes": 3 * 2**20,
        "resident_bytes": 5 * 2**20,
        "seconds_per_step": 0.1,
    }
    return {
        "schema": SCHEMA,
        "model": {"name": "tiny", "kind": "encoder", "n_target_layers": 1},
        "reference": {"metric": "cosine", "value": 1.0},
        "rows": [
            _row("nf:bits=4,blocksize=64", "lqmod", 4.5, 0.09, 0.97),
            _row("bnb-nf4:blocksize=64", "baseline", 4.5, 0.09, 0.97),
            {
                "label": "gptq:bits=3",
                "kind": "baseline",
                "name": "gptq",
                "config": {"bits": 3},
                "notes": [],
                "status": "unavailable",
                "reason": "gptqmodel not installed",
            },
        ],
        "finetune": {
            "objective": "distil",
            "loss_name": "1 - cos",
            "fidelity_metric": "cosine",
            "memory_note": "saved",
            "runs": [
                run,
                {**run, "method": "bnb+peft"},
                {"method": "x", "base": "NF4 b64", "status": "unavailable", "reason": "no bnb"},
            ],
        },
    }


def test_write_report_files(results: dict[str, Any], tmp_path: Path) -> None:
    paths = write_report(results, tmp_path)
    assert set(paths) == {"json", "md", "error_vs_bits", "fidelity", "finetune"}
    data = json.loads(paths["json"].read_text())
    assert data["schema"] == SCHEMA
    assert {r["status"] for r in data["rows"]} == {"ok", "unavailable"}
    for row in data["rows"]:
        assert {"label", "kind", "name", "config", "status"} <= set(row)
        if row["status"] == "ok":
            assert {"bits_per_param", "w_err", "out_err", "fidelity", "layers", "source"} <= set(row)
    for key in ("error_vs_bits", "fidelity", "finetune"):
        head = paths[key].read_bytes()[:8]
        assert head == PNG_MAGIC, key
        assert paths[key].stat().st_size > 5000
    assert "gptqmodel not installed" in paths["md"].read_text()


def test_tables_keep_rows_that_could_not_run(results: dict[str, Any]) -> None:
    cells = quant_table(results)
    assert cells[0][0] == "fp32 (unquantized)"
    assert [c[0] for c in cells[1:]] == [r["label"] for r in results["rows"]]
    assert cells[3][2] == "unavailable: gptqmodel not installed"
    md = markdown_tables(results)
    assert md.count("\n| ") >= 4 + 3 and "| 0.09 |" in md and "0.3000→0.1000" in md
