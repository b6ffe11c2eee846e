# mypy: disable-error-code="no-untyped-def"
# (triton.jit parameters carry no Python types: triton reads annotations as tl.constexpr markers.)
"""Fused LutFormat matmuls: ``y = x W^T`` and ``grad_x = g W`` with W rebuilt in registers.

Each program rebuilds the tile of W it needs from the packed codes (see
:func:`~lqmod.kernels.triton.lut_tile.weight_tile`) right before ``tl.dot``: the dense
weight never reaches global memory, so the traffic is the quantized bytes plus activations.
Decorated at import: import only through :func:`lqmod.kernels.triton.import_kernels`.

Only builtins of ``triton.language`` appear here (``tl.full``, not ``tl.zeros``; arithmetic,
not ``tl.cdiv``): triton's own ``@jit`` helpers are decorated when triton is first
imported, often by another library before the interpreter was chosen, and then refuse to
run inside an interpreted kernel.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl
from triton import knobs

from lqmod.kernels.triton.lut_tile import column_groups, weight_tile

INTERPRETED = bool(knobs.runtime.interpret)

# The autotuner keys on a power-of-two bucket of the token count, not on M itself, so a
# training run with ragged sequence lengths does not re-tune at every new length.
_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "HAS_G_IDX"]


def autotune_configs() -> list[triton.Config]:
    """Tile shapes to try; the interpreter gets one, as every program costs host time there."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8})]
    shapes = [
        # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): small-M shapes for decoding, square
        # tensor-core tiles for training batches. BLOCK_K stays 64 so that the common
        # groups (64, 128, ...) hold whole tiles and scales load once per row; the
        # 2-stage config fits every format within an A100's shared memory.
        (16, 64, 64, 4, 4),
        (16, 128, 64, 4, 4),
        (32, 64, 64, 4, 4),
        (32, 128, 64, 4, 4),
        (64, 64, 64, 4, 2),
        (64, 64, 64, 4, 4),
        (64, 128, 64, 4, 3),
        (128, 64, 64, 4, 4),
        (128, 128, 64, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **_: Any) -> list[triton.Config]:
    # A BLOCK_M far above the token count only burns tensor-core cycles on padding rows.
    # The 2-stage config always stays: it is the one that fits every GPU's shared memory.
    limit = max(16, int(named_args["M_BUCKET"]))
    return [c for c in configs if c.kwargs["BLOCK_M"] <= limit or c.num_stages == 2]


@triton.autotune(configs=autotune_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def lut_matmul_kernel(
    # pointers
    x_ptr,
    codes_ptr,
    table_ptr,
    scales_ptr,
    zeros_ptr,
    g_idx_ptr,
    y_ptr,
    # sizes: x (M, K), W (N, K), y (M, N)
    M,
    N,
    K,
    n_groups,
    n_code_bytes,
    M_BUCKET,
    # strides
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yn,
    # constexpr
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    ROWS_ALIGNED: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``y[M, N] = x[M, K] @ W[N, K]^T``, accumulated in float32."""
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        )
        # W^T tile (BLOCK_K, BLOCK_N): rows of W along the second axis.
        groups = column_groups(g_idx_ptr, offs_k[:, None], k0, K, GROUP_SIZE, HAS_G_IDX, BLOCK_K)
        w = weight_tile(
            codes_ptr, table_ptr, scales_ptr, zeros_ptr,
            offs_n[None, :], offs_k[:, None], groups, N, K, n_groups, n_code_bytes,
            BITS, HAS_ZEROS, ROWS_ALIGNED,
        )  # fmt: skip
        acc = _dot(x, w, acc, DOT_FP32, INPUT_PRECISION)
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


@triton.autotune(configs=autotune_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def lut_matmul_t_kernel(
    # pointers
    g_ptr,
    codes_ptr,
    table_ptr,
    scales_ptr,
    zeros_ptr,
    g_idx_ptr,
    out_ptr,
    # sizes: g (M, N), W (N, K), out (M, K)
    M,
    N,
    K,
    n_groups,
    n_code_bytes,
    M_BUCKET,
    # strides
    stride_gm,
    stride_gn,
    stride_om,
    stride_ok,
    # constexpr
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    ROWS_ALIGNED: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``out[M, K] = g[M, N] @ W[N, K]``: the input gradient, reduced over the N axis."""
    pid_m, pid_k = _grouped_pid(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
    # This program's columns are fixed: look their groups up once, not per N step.
    groups = column_groups(g_idx_ptr, offs_k[None, :], pid_k * BLOCK_K, K, GROUP_SIZE, HAS_G_IDX, BLOCK_K)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(
            g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
            mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
            other=0.0,
        )
        w = weight_tile(
            codes_ptr, table_ptr, scales_ptr, zeros_ptr,
            offs_n[:, None], offs_k[None, :], groups, N, K, n_groups, n_code_bytes,
            BITS, HAS_ZEROS, ROWS_ALIGNED,
        )  # fmt: skip
        acc = _dot(g, w, acc, DOT_FP32, INPUT_PRECISION)
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok,
        acc.to(out_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
    )


@triton.jit
def _grouped_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Tutorial 03's grouped ordering: neighbouring programs share W tiles in L2.
    pid = tl.program_id(axis=0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _dot(a, w, acc, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    if DOT_FP32:
        # float32 inputs, or the interpreter, whose bf16/fp16 arithmetic is not faithful.
        return tl.dot(a.to(tl.float32), w, acc, input_precision=INPUT_PRECISION)
    # Half-precision tensor cores: round the rebuilt weight to the activation dtype, as a
    # dense layer in that dtype would hold it.
    return tl.dot(a, w.to(a.dtype), acc)
