"""Backend choice: declared capabilities, the CPU default, and explicit requests."""

from __future__ import annotations

import pytest
import torch
from lut_cases import random_table, wrap

from lqmod.kernels import native, select_backend
from lqmod.kernels.base import Capabilities
from lqmod.kernels.triton.backend import FUSED, TILED, TritonLutBackend

CPU = torch.device("cpu")


def test_cpu_defaults_to_native_then_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LQMOD_TRITON_INTERPRET", raising=False)
    case = wrap(random_table((8, 16), 4, 8, seed=0))
    # Without a lut_format only the reference applies; with one, the compiled kernel if built.
    assert select_backend(case.qweight, CPU).name == "torch"
    expected = "native" if native.available() else "torch"
    assert select_backend(case.qweight, CPU, lut_format=case.lut_format).name == expected
    assert select_backend(case.qweight, CPU, lut_format=lambda qw: None).name == "torch"
    assert select_backend(case.qweight, CPU, lut_format=case.lut_format, backend="torch").name == "torch"


def test_explicit_native_fails_loudly() -> None:
    case = wrap(random_table((8, 16), 4, 8, seed=0))
    with pytest.raises(ValueError, match="native backend cannot run 'lut-test' weights: the quantizer declares no"):
        select_backend(case.qweight, CPU, backend="native")
    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.unavailable_reason()}")
    with pytest.raises(ValueError, match="no LutFormat"):
        select_backend(case.qweight, CPU, lut_format=lambda qw: None, backend="native")
    with pytest.raises(ValueError, match="device 'meta' not in"):
        select_backend(case.qweight, torch.device("meta"), lut_format=case.lut_format, backend="native")


def test_env_asks_for_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("LQMOD_TRITON_INTERPRET", "1")
    case = wrap(random_table((8, 16), 4, 8, seed=0))
    assert isinstance(select_backend(case.qweight, CPU, lut_format=case.lut_format), TritonLutBackend)
    # A quantizer without a LutFormat still works, through the reference.
    assert select_backend(case.qweight, CPU).name == "torch"
    assert select_backend(case.qweight, CPU, lut_format=case.lut_format, backend="torch").name == "torch"


def test_explicit_triton_fails_loudly() -> None:
    case = wrap(random_table((8, 16), 4, 8, seed=0))
    with pytest.raises(ValueError, match="no lut_format"):
        select_backend(case.qweight, CPU, backend="triton")
    with pytest.raises(ValueError, match="no LutFormat"):
        select_backend(case.qweight, CPU, lut_format=lambda qw: None, backend="triton")
    with pytest.raises(ValueError, match="choose one of"):
        select_backend(case.qweight, CPU, lut_format=case.lut_format, backend="cuda")  # type: ignore[arg-type]


def test_capabilities_are_checked() -> None:
    fmt = random_table((8, 16), 5, 8, seed=0)
    assert FUSED.unsupported(fmt, "cuda") == "5-bit codes not in [2, 3, 4, 8]"
    assert TILED.unsupported(fmt, "cuda") is None
    assert "float64" in (FUSED.unsupported(random_table((8, 16), 4, 8, 0), "cuda", torch.float64) or "")
    assert "device 'mps'" in (TILED.unsupported(fmt, "mps") or "")
    narrow = Capabilities(frozenset({"cuda"}), frozenset({4}), frozenset({torch.float16}), 4, g_idx=False)
    assert "group_size 8 > 4" in (narrow.unsupported(random_table((8, 16), 4, 8, 0), "cuda") or "")


def test_path_falls_back_from_fused_to_tiled() -> None:
    backend = TritonLutBackend(lambda qw: None)
    x = torch.zeros(2, 16)
    assert backend._path(random_table((8, 16), 4, 8, 0), x) == "fused"
    assert backend._path(random_table((8, 16), 6, 8, 0), x) == "tiled"
    assert backend._path(random_table((8, 16), 4, 8, 0), x.double()) == "tiled"
    with pytest.raises(ValueError, match="fused Triton kernel"):
        TritonLutBackend(lambda qw: None, strategy="fused")._path(random_table((8, 16), 6, 8, 0), x)
