"""The kernels compile for real GPUs, checked on a machine without one (triton AOT + ptxas)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.triton, pytest.mark.slow]

# Shared memory per block an A100 grants (163 KiB; an H100 grants 227 KiB).
A100_SHARED = 166912


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_nvidia(arch: int) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LQMOD_TRITON_INTERPRET")}
    script = Path(__file__).with_name("compile_kernels.py")
    done = subprocess.run(
        [sys.executable, str(script), str(arch), "fallback"], capture_output=True, text=True, env=env, timeout=300
    )
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("triton's bundled ptxas is unavailable")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {(r["kernel"], r["format"]) for r in rows} == {
        (k, f)
        for k in ("lut_matmul_kernel", "lut_matmul_t_kernel", "lut_dequant_kernel")
        for f in ("nf4", "int3-act-order", "lut8-g128")
    }
    too_big = [r for r in rows if r["shared"] > A100_SHARED]
    assert not too_big, f"the fallback config must fit every GPU's shared memory: {too_big}"
