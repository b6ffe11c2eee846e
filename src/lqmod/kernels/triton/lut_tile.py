# mypy: disable-error-code="no-untyped-def"
# (triton.jit parameters carry no Python types: triton reads annotations as tl.constexpr markers.)
"""The pieces every LutFormat kernel shares: rebuild a tile of W in registers.

Decorated at import: import this module only through
:func:`lqmod.kernels.triton.import_kernels`, which first settles interpreter versus GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def column_groups(g_idx_ptr, cols, k0, K, GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr, BLOCK_K: tl.constexpr):
    """The scale group of each column in ``cols`` (columns ``k0 .. k0 + BLOCK_K``).

    When the whole tile lies in one group (no g_idx, ``GROUP_SIZE % BLOCK_K == 0``) this is
    ``k0 // GROUP_SIZE`` as a (1, 1) tensor: scales are then read once per row rather than once
    per element, which keeps the software pipeline's shared-memory copy of them small.
    Out-of-range columns map to group 0 so their (masked) loads stay in bounds.
    """
    if HAS_G_IDX:
        return tl.load(g_idx_ptr + cols, mask=cols < K, other=0)
    elif GROUP_SIZE % BLOCK_K == 0:
        return tl.full((1, 1), 0, tl.int32) + k0 // GROUP_SIZE
    else:
        return tl.where(cols < K, cols // GROUP_SIZE, 0)


@triton.jit
def weight_tile(
    # pointers
    codes_ptr,
    table_ptr,
    scales_ptr,
    zeros_ptr,
    # indices (broadcastable int tensors: rows of W, columns of W, their groups) and sizes
    rows,
    cols,
    groups,
    N,
    K,
    n_groups,
    n_code_bytes,
    # constexpr
    BITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    ROWS_ALIGNED: tl.constexpr,
):
    """float32 ``W[rows, cols]`` (zero outside the matrix), shaped like ``rows + cols``."""
    mask = (rows < N) & (cols < K)
    MASK: tl.constexpr = (1 << BITS) - 1
    if ROWS_ALIGNED:
        # Rows start on a byte (K * BITS % 8 == 0, every practical shape): only the per-row
        # base needs 64 bits, the per-element part stays in cheap 32-bit integers.
        col_bit = cols * BITS
        offset = rows.to(tl.int64) * ((K * BITS) // 8) + col_bit // 8
        in_byte = col_bit % 8
    else:
        # int64 throughout: out * in * bits overflows int32 for vocabulary-sized matrices.
        bit = (rows.to(tl.int64) * K + cols) * BITS
        offset = bit // 8
        in_byte = (bit % 8).to(tl.int32)
    if BITS == 8:
        code = tl.load(codes_ptr + offset, mask=mask, other=0).to(tl.int32)
    elif 8 % BITS == 0:
        byte = tl.load(codes_ptr + offset, mask=mask, other=0).to(tl.int32)
        # MSB-first: the first code of a byte sits in its highest bits.
        code = (byte >> (8 - BITS - in_byte)) & MASK
    else:
        # Widths that do not divide 8 straddle bytes: read a 16-bit window (big-endian, as
        # the stream is MSB-first) and cut the code out of it.
        hi = tl.load(codes_ptr + offset, mask=mask, other=0).to(tl.int32)
        lo = tl.load(codes_ptr + offset + 1, mask=mask & (offset + 1 < n_code_bytes), other=0).to(tl.int32)
        code = (((hi << 8) | lo) >> (16 - BITS - in_byte)) & MASK
    value = tl.load(table_ptr + code, mask=mask, other=0.0)
    # Shaped like rows + groups: (rows, 1) when the tile has a single group.
    at = rows.to(tl.int64) * n_groups + groups
    at_mask = (rows < N) & (groups >= 0)
    w = value * tl.load(scales_ptr + at, mask=at_mask, other=0.0)
    if HAS_ZEROS:
        w += tl.load(zeros_ptr + at, mask=at_mask, other=0.0)
    return w
