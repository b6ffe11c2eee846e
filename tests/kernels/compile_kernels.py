"""Compile the LutFormat kernels for NVIDIA targets without a GPU (run as a script).

triton lowers to PTX and runs its bundled ptxas without touching a driver, so a CPU
machine can still catch kernels that do not compile, and read their shared-memory use.
Prints one JSON line per compiled kernel. Must run in a process where the kernel modules
are decorated for the GPU, i.e. without TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lqmod.kernels.triton import dequant, lut_matmul

FORMATS: dict[str, dict[str, Any]] = {
    "nf4": {"BITS": 4, "GROUP_SIZE": 64, "HAS_ZEROS": False, "HAS_G_IDX": False, "ROWS_ALIGNED": True},
    "int3-act-order": {"BITS": 3, "GROUP_SIZE": 32, "HAS_ZEROS": True, "HAS_G_IDX": True, "ROWS_ALIGNED": False},
    "lut8-g128": {"BITS": 8, "GROUP_SIZE": 128, "HAS_ZEROS": False, "HAS_G_IDX": False, "ROWS_ALIGNED": True},
}
POINTERS = {"codes_ptr": "*u8", "g_idx_ptr": "*i32", "table_ptr": "*fp32", "scales_ptr": "*fp32", "zeros_ptr": "*fp32"}


def signature(fn: Any, activation: str, constexprs: dict[str, Any]) -> dict[str, str]:
    def kind(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return POINTERS.get(name, activation)
        return "i32"

    return {name: kind(name) for name in fn.arg_names}


def compile_one(fn: Any, constexprs: dict[str, Any], activation: str, arch: int, **options: int) -> dict[str, Any]:
    source = ASTSource(fn=fn, signature=signature(fn, activation, constexprs), constexprs=constexprs)
    start = time.perf_counter()
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return {"shared": int(kernel.metadata.shared), "seconds": round(time.perf_counter() - start, 2)}


def main(arch: int, which: str) -> None:
    """Compile every format with ``which`` configs: "all", or "fallback" (the 2-stage one
    that must fit every format in an A100's shared memory), with bf16 and fp32 inputs."""
    assert not lut_matmul.INTERPRETED, "kernel modules were decorated for the interpreter"
    configs = lut_matmul.autotune_configs()
    chosen = configs if which == "all" else [c for c in configs if c.num_stages == 2]
    for fmt_name, fmt in FORMATS.items():
        for kernel in (lut_matmul.lut_matmul_kernel, lut_matmul.lut_matmul_t_kernel):
            for cfg in chosen:
                for activation in ("*bf16", "*fp32"):
                    consts = dict(fmt, DOT_FP32=activation == "*fp32", INPUT_PRECISION="ieee", **cfg.kwargs)
                    row = compile_one(kernel.fn, consts, activation, arch, num_warps=cfg.num_warps,
                                      num_stages=cfg.num_stages)  # fmt: skip
                    row.update(kernel=kernel.fn.__name__, format=fmt_name, activation=activation,
                               config=[*cfg.kwargs.values(), cfg.num_warps, cfg.num_stages])  # fmt: skip
                    print(json.dumps(row), flush=True)
        block_r, block_c, warps = dequant.block_shape()
        consts = dict(fmt, BLOCK_R=block_r, BLOCK_C=block_c)
        row = compile_one(dequant.lut_dequant_kernel, consts, "*bf16", arch, num_warps=warps)
        row.update(kernel="lut_dequant_kernel", format=fmt_name, activation="*bf16", config=[block_r, block_c])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "fallback")
