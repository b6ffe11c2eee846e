# mypy: disable-error-code="no-untyped-def"
# (triton.jit parameters carry no Python types: triton reads annotations as tl.constexpr markers.)
"""Dequantize-only LutFormat kernel: writes a block of W's rows to memory.

For what the fused matmuls do not take (see ``TILED`` in
:mod:`lqmod.kernels.triton.backend`): the caller rebuilds W a row block at a time and hands
each block to the vendor matmul, so memory stays bounded by one block.
Decorated at import: import only through :func:`lqmod.kernels.triton.import_kernels`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

from lqmod.kernels.triton.lut_tile import column_groups, weight_tile

INTERPRETED = bool(knobs.runtime.interpret)


def block_shape() -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps); the interpreter wants few, large programs."""
    if INTERPRETED:
        return 64, 256, 1
    # Pure streaming: 8 KiB of codes per program is enough to hide latency.
    return 32, 256, 4


@triton.jit
def lut_dequant_kernel(
    # pointers
    codes_ptr,
    table_ptr,
    scales_ptr,
    zeros_ptr,
    g_idx_ptr,
    out_ptr,
    # sizes: W (N, K); this launch writes rows [row0, row0 + n_rows)
    N,
    K,
    n_groups,
    n_code_bytes,
    row0,
    n_rows,
    # strides of out (n_rows, K)
    stride_or,
    stride_oc,
    # constexpr
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    ROWS_ALIGNED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_r = tl.program_id(axis=0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(axis=1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = row0 + offs_r[:, None]
    cols = offs_c[None, :]
    groups = column_groups(g_idx_ptr, cols, tl.program_id(axis=1) * BLOCK_C, K, GROUP_SIZE, HAS_G_IDX, BLOCK_C)
    w = weight_tile(
        codes_ptr, table_ptr, scales_ptr, zeros_ptr,
        rows, cols, groups, N, K, n_groups, n_code_bytes,
        BITS, HAS_ZEROS, ROWS_ALIGNED,
    )  # fmt: skip
    tl.store(
        out_ptr + offs_r[:, None] * stride_or + cols * stride_oc,
        w.to(out_ptr.dtype.element_ty),
        mask=(offs_r[:, None] < n_rows) & (cols < K),
    )
