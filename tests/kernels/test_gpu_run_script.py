"""benchmarks/gpu/run.sh and bench_gpu.py: the parts that run without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "benchmarks" / "gpu" / "run.sh"


def run(*args: str, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(RUN), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize(
    ("cuda", "tag"),
    [("11.8", "cu118"), ("12.0", "cu118"), ("12.4", "cu124"), ("12.5", "cu124"), ("12.8", "cu128"), ("13.2", "cu130")],
)
def test_torch_index_follows_the_driver(cuda: str, tag: str) -> None:
    proc = run("--print-torch-index", cuda)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"https://download.pytorch.org/whl/{tag}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--print-torch-index", "twelve"), "CUDA version must look like 12.4, got 'twelve'"),
        (("--print-torch-index", "11.4"), "older than 11.8"),
        (("--bogus",), "unknown argument '--bogus'"),
        (("--bench", "everything"), "--bench takes kernels, memory or all"),
        (("--out",), "--out needs a folder"),
    ],
)
def test_bad_arguments_fail_with_a_message(args: tuple[str, ...], message: str) -> None:
    proc = run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_help() -> None:
    proc = run("--help")
    assert proc.returncode == 0 and "--dry-run" in proc.stdout


@pytest.mark.slow
def test_dry_run_writes_the_json(tmp_path: Path) -> None:
    proc = run("--dry-run", "--skip-tests", "--bench", "kernels", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["dry_run"] is True and summary["torch_choice"].startswith("current python")
    assert [(s["step"], s["exit"]) for s in summary["steps"]] == [("bench", 0)]
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert kernels["dry_run"] is True and kernels["bandwidth_gbs"] > 0
    rows = kernels["results"]
    assert {r["batch"] for r in rows} == {1, 16, 512}
    assert {r["mode"] for r in rows} == {"forward", "fwd_bwd"}
    methods = {r["method"] for r in rows}
    assert any(m.startswith("lqmod-") for m in methods) and "dense" in methods
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["hbm_roofline_frac"] > 0 and r["ratio_to_dense"] > 0
    # Every format of the CPU kernel benchmark is materialized too (LUT ones, act-order, ICQ, QuIP).
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_kernels
    finally:
        sys.path.pop(0)
    mat = kernels["materialize"]
    assert not [r for r in mat if "error" in r]
    assert {r["format"] for r in mat} >= set(bench_kernels.FORMATS) | {"bnb", "dense"}
    assert all(r["ms"] > 0 for r in mat)


@pytest.mark.slow
def test_memory_dry_run(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    assert bench_gpu.main(["memory", "--dry-run", "--out", str(tmp_path)]) == 0
    memory = json.loads((tmp_path / "memory.json").read_text())
    assert set(memory["results"]) == {"lqmod", "bnb+peft", "lqmod-dense-weight-saved"}
    losses = set()
    for name, row in memory["results"].items():
        assert "error" not in row, (name, row)
        losses.add(row["loss"])
    assert len(losses) == 1  # the same toy model and batch under all three: only kernels differ


@pytest.mark.slow
def test_without_cuda_the_benchmark_refuses(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu" / "bench_gpu.py"), "kernels", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
