"""Launchers for the LutFormat kernels: check shapes, allocate, launch.

Triton itself is imported here, but the ``@triton.jit`` kernels only through
:func:`~lqmod.kernels.triton.import_kernels`, which first settles interpreter versus GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton

from lqmod.kernels.formats import LutFormat
from lqmod.kernels.triton import import_kernels

__all__ = ["lut_dequant", "lut_matmul", "lut_matmul_t"]


def lut_matmul(x: torch.Tensor, fmt: LutFormat) -> torch.Tensor:
    """``x @ W.T`` for ``x`` (M, K): output (M, N) in ``x.dtype``, W never in memory."""
    n, k = fmt.shape
    _check_activation(x, k, fmt, "x")
    matmul, _ = import_kernels(x.device)
    x = _prepare(x, matmul.INTERPRETED)
    m = x.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=_store_dtype(x.dtype, matmul.INTERPRETED))
    if m == 0:
        return y.to(x.dtype)

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    matmul.lut_matmul_kernel[grid](
        x, *_pointers(fmt), y,
        m, n, k, fmt.n_groups, fmt.codes.numel(), _bucket(m),
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        **_constexprs(fmt), **_dot_options(x.dtype, matmul.INTERPRETED),
    )  # fmt: skip
    return y.to(x.dtype)


def lut_matmul_t(g: torch.Tensor, fmt: LutFormat) -> torch.Tensor:
    """``g @ W`` for ``g`` (M, N): output (M, K) in ``g.dtype``, W never in memory."""
    n, k = fmt.shape
    _check_activation(g, n, fmt, "g")
    matmul, _ = import_kernels(g.device)
    g = _prepare(g, matmul.INTERPRETED)
    m = g.shape[0]
    out = torch.empty((m, k), device=g.device, dtype=_store_dtype(g.dtype, matmul.INTERPRETED))
    if m == 0:
        return out.to(g.dtype)

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)

    matmul.lut_matmul_t_kernel[grid](
        g, *_pointers(fmt), out,
        m, n, k, fmt.n_groups, fmt.codes.numel(), _bucket(m),
        g.stride(0), g.stride(1), out.stride(0), out.stride(1),
        **_constexprs(fmt), **_dot_options(g.dtype, matmul.INTERPRETED),
    )  # fmt: skip
    return out.to(g.dtype)


def lut_dequant(fmt: LutFormat, dtype: torch.dtype, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Dense rows ``rows[0]:rows[1]`` (default: all) of W in ``dtype``."""
    n, k = fmt.shape
    r0, r1 = rows if rows is not None else (0, n)
    if not 0 <= r0 <= r1 <= n:
        raise ValueError(f"rows {rows} out of range for {n} output rows")
    _, dequant = import_kernels(fmt.device)
    out = torch.empty((r1 - r0, k), device=fmt.device, dtype=_store_dtype(dtype, dequant.INTERPRETED))
    if r1 == r0:
        return out.to(dtype)
    block_r, block_c, warps = dequant.block_shape()
    grid = (triton.cdiv(r1 - r0, block_r), triton.cdiv(k, block_c))
    dequant.lut_dequant_kernel[grid](
        *_pointers(fmt), out,
        n, k, fmt.n_groups, fmt.codes.numel(), r0, r1 - r0,
        out.stride(0), out.stride(1),
        **_constexprs(fmt), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return out.to(dtype)


def _check_activation(t: torch.Tensor, features: int, fmt: LutFormat, name: str) -> None:
    if t.dim() != 2 or t.shape[1] != features:
        raise ValueError(f"{name} must be (tokens, {features}) for a {fmt.shape} weight, got {tuple(t.shape)}")
    if t.device != fmt.device:
        raise ValueError(f"{name} is on {t.device}, the quantized weight on {fmt.device}")


def _prepare(t: torch.Tensor, interpreted: bool) -> torch.Tensor:
    # The interpreter mishandles strided views; on the GPU only a strided K axis hurts
    # (uncoalesced loads), so only that is copied.
    if interpreted or t.stride(-1) != 1:
        return t.contiguous()
    return t


def _store_dtype(dtype: torch.dtype, interpreted: bool) -> torch.dtype:
    # The interpreter truncates float32 to bfloat16 instead of rounding to nearest, which
    # doubles the output error; there the kernel stores float32 and torch rounds. A no-op
    # `.to` on the GPU path.
    if interpreted and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


def _pointers(fmt: LutFormat) -> tuple[torch.Tensor, ...]:
    # Absent tensors still need a pointer argument; the HAS_* constexprs keep the kernel
    # from ever dereferencing the stand-in.
    zeros = fmt.zeros if fmt.zeros is not None else fmt.scales
    g_idx = fmt.g_idx if fmt.g_idx is not None else fmt.scales
    return (
        fmt.codes.reshape(-1).contiguous(),
        fmt.table.contiguous(),
        fmt.scales.contiguous(),
        zeros.contiguous(),
        g_idx.contiguous(),
    )


def _constexprs(fmt: LutFormat) -> dict[str, Any]:
    return {
        "BITS": fmt.bits,
        "GROUP_SIZE": fmt.group_size,
        "HAS_ZEROS": fmt.zeros is not None,
        "HAS_G_IDX": fmt.g_idx is not None,
        "ROWS_ALIGNED": fmt.shape[1] * fmt.bits % 8 == 0,
    }


def _dot_options(dtype: torch.dtype, interpreted: bool) -> dict[str, Any]:
    # float32 inputs get IEEE products unless torch itself allows TF32, so the kernel is no
    # less accurate than the dense torch matmul it replaces.
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreted
    return {
        "DOT_FP32": interpreted or dtype == torch.float32,
        "INPUT_PRECISION": "tf32" if tf32 else "ieee",
    }


def _bucket(m: int) -> int:
    return min(triton.next_power_of_2(m), 4096)
