"""A compiled CPU kernel for :class:`~lqmod.kernels.formats.LutFormat` weights.

``lut_cpu.c`` (plain C, AVX2 where the CPU has it, OpenMP over rows) is compiled on first
use with the system C compiler into a per-user cache and called through :mod:`ctypes`; it
needs no torch headers, ninja or pybind11 and builds in about a second. When there is no
compiler, or the build fails, :func:`unavailable_reason` says why and the backend selection
keeps the plain-torch reference: the library stays installable and correct everywhere.

The kernel's result is bit for bit :func:`lqmod.kernels.reference.materialize_lut`'s (same
float32 operations in the same order, no fused multiply-add, round-to-nearest-even casts);
the tests hold the two equal for every bit width, layout and output dtype.

A fresh output buffer is advised transparent huge pages when large (:mod:`.hugepages`): its
first-touch page faults otherwise cost several times the kernel's own work.

Environment: ``LQMOD_NATIVE=0`` disables the kernel; ``LQMOD_HUGEPAGES=0`` the advice; ``LQMOD_CACHE_DIR`` (default
``~/.cache/lqmod``) is where the library is built; ``CC`` picks the compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from lqmod.kernels.formats import LutFormat
from lqmod.kernels.native import hugepages

__all__ = ["OUT_DTYPES", "available", "has_avx2", "lut_materialize", "lut_materialize_raw", "unavailable_reason"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lut_cpu.c")
OUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


def available() -> bool:
    """Whether the compiled kernel can run in this process (builds it on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why the compiled kernel cannot be used in this process; None when it can (builds it)."""
    _load()
    return _reason


def _load() -> ctypes.CDLL | None:
    global _lib, _reason, _tried
    if _tried:  # the hot path: one global read
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            _lib = _build_and_open()
        except _Unavailable as exc:
            _reason = str(exc)
        except (OSError, subprocess.SubprocessError) as exc:  # a broken toolchain is not fatal
            _reason = f"building {SOURCE.name} failed: {exc}"
        if _reason is not None:
            log.info("lqmod native CPU kernel unavailable (%s); using the torch reference", _reason)
        _tried = True
    return _lib


class _Unavailable(Exception):
    pass


def _flags() -> list[str]:
    flags = ["-O3", "-shared", "-fPIC", "-std=c11", "-ffp-contract=off", "-fno-math-errno"]
    # AVX2 only where the CPU has it (torch checked); the scalar path is portable C.
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mf16c"]
    return flags


def _build_and_open() -> ctypes.CDLL:
    if os.environ.get("LQMOD_NATIVE", "").strip().lower() in ("0", "false", "no", "off"):
        raise _Unavailable("disabled by LQMOD_NATIVE=0")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise _Unavailable("no C compiler found (set CC, or install gcc)")
    source = SOURCE.read_bytes()
    flags = _flags()
    # OpenMP is optional: without it the kernel is single-threaded but still correct.
    for omp in (["-fopenmp"], []):
        key = hashlib.sha256(source + " ".join([cc, *flags, *omp]).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("LQMOD_CACHE_DIR") or Path.home() / ".cache" / "lqmod") / "kernels"
        target = cache / f"lut_cpu-{key}.so"
        if not target.exists():
            cache.mkdir(parents=True, exist_ok=True)
            # Build beside the target and rename: concurrent processes never see half a file.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            proc = subprocess.run(
                [cc, *flags, *omp, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120
            )
            if proc.returncode != 0:
                os.unlink(tmp)
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                log.debug("native kernel build with %s failed: %s", omp, proc.stderr)
                if omp:
                    continue
                raise _Unavailable(f"{cc} could not compile {SOURCE.name}: {last}")
            os.replace(tmp, target)
        return _declare(ctypes.CDLL(str(target)))
    raise _Unavailable("unreachable")  # pragma: no cover


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn = lib.lqmod_lut_materialize
    fn.argtypes = [p, i64, i32, i64, i64, i64, p, p, p, i64, p, i64, p, i32, i32]
    fn.restype = ctypes.c_int
    lib.lqmod_lut_has_avx2.restype = ctypes.c_int
    return lib


def has_avx2() -> bool:
    """Whether the built kernel has its vector path (False when unavailable)."""
    lib = _load()
    return bool(lib is not None and lib.lqmod_lut_has_avx2())


def lut_materialize(
    fmt: LutFormat,
    dtype: torch.dtype = torch.float32,
    rows: tuple[int, int] | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`~lqmod.kernels.reference.materialize_lut` (same signature, same bits), compiled.

    Raises RuntimeError when the kernel is unavailable (see :func:`unavailable_reason`).
    """
    return lut_materialize_raw(
        fmt.codes, fmt.bits, fmt.shape, fmt.table, fmt.scales, fmt.group_size,
        zeros=fmt.zeros, g_idx=fmt.g_idx, dtype=dtype, rows=rows, out=out,
    )  # fmt: skip


def lut_materialize_raw(
    codes: torch.Tensor,
    bits: int,
    shape: tuple[int, int],
    table: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    *,
    zeros: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    rows: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`lut_materialize` on the tensors of a LutFormat, without building one.

    For hot paths (a double-quantized scale decode in every forward) where LutFormat's
    construction checks cost as much as the work. The caller guarantees what LutFormat
    checks: uint8 codes, float32 table of ``2**bits``, float32 (out, n_groups) scales and
    zeros, int32 g_idx. Only what would make the C code read out of bounds is checked here.
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the native CPU kernel is unavailable: {_reason}")
    kind = OUT_DTYPES.get(dtype)
    if kind is None:
        raise ValueError(f"native LUT kernel output dtype must be one of float32, bfloat16, float16; got {dtype}")
    out_f, in_f = shape
    r0, r1 = rows if rows is not None else (0, out_f)
    if not 0 <= r0 <= r1 <= out_f:
        raise ValueError(f"rows {rows} out of range for {out_f} output rows")
    # Plain attribute tests, no generator: this runs several times in every forward and backward.
    if not (
        codes.is_cpu and table.is_cpu and scales.is_cpu
        and (zeros is None or zeros.is_cpu) and (g_idx is None or g_idx.is_cpu)
    ):  # fmt: skip
        raise ValueError("the native LUT kernel needs CPU tensors")
    codes = codes.reshape(-1).contiguous()
    table, scales = table.contiguous(), scales.contiguous()
    if table.numel() < 1 << bits or scales.dim() != 2 or scales.shape[0] != out_f:
        raise ValueError(f"table of {table.numel()} entries or scales {tuple(scales.shape)} do not fit {shape}")
    n_groups = scales.shape[1]
    if zeros is not None:
        zeros = zeros.contiguous()
        if zeros.shape != scales.shape:
            raise ValueError(f"zeros {tuple(zeros.shape)} must have the scales' shape {tuple(scales.shape)}")
    if g_idx is not None:
        g_idx = g_idx.contiguous()
        if g_idx.numel() != in_f:
            raise ValueError(f"g_idx has {g_idx.numel()} entries, expected in_features={in_f}")
    elif -(-in_f // group_size) > n_groups:
        raise ValueError(f"scales have {n_groups} groups, {in_f} columns in groups of {group_size} need more")
    if out is None:
        out = hugepages.empty(r1 - r0, in_f, dtype)
    elif out.dtype != dtype or tuple(out.shape) != (r1 - r0, in_f) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {(r1 - r0, in_f)}")
    rc = lib.lqmod_lut_materialize(
        codes.data_ptr(), codes.numel(), bits, in_f, r0, r1, table.data_ptr(), scales.data_ptr(),
        zeros.data_ptr() if zeros is not None else None, n_groups,
        g_idx.data_ptr() if g_idx is not None else None, group_size, out.data_ptr(), kind,
        torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"native LUT kernel refused its arguments (code {rc}): shape {shape}, bits {bits}")
    return out
