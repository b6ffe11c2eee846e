"""Materialize throughput for every LUT-format quantizer, and a LoRA layer's forward+backward.

Compared, interleaved in one process (every repetition runs every method once, so a burst
of load from other processes on a shared machine hits all of them alike):

* ``lqmod-native`` (CPU): the compiled LUT kernel the CPU backend picks (``select_backend``);
* ``lqmod-torch``: the quantizer's own pure-torch ``materialize``, the reference/fallback;
* ``lqmod-triton`` (CUDA): the Triton dequantize kernel / fused LoRA layer;
* ``bnb``: bitsandbytes' NF4 ``dequantize_4bit`` (blocksize 64, compressed statistics), and
  ``Linear4bit`` + PEFT's LoRA for the layer;
* ``dense``: a copy of the dense weight (materialize) / ``nn.Linear`` + PEFT's LoRA (layer).

Formats (weights synthesised with random codes of each quantizer's own tensor layout;
materialize cost does not depend on the values): NF4/NF3 (blocksize 64, double
quantization), OPTQ 4/3/2-bit (group 128, asymmetric) and 4-bit act-order (groups of 128
and of 32 columns scattered over the row, as GPTQ's g_idx makes them: 8 and 32 groups at
1024 columns, 32 and 128 at 4096), RTN 4-bit, ICQ over NF4 (every LUT-format quantizer),
and QuIP#-like 2/4-bit (E8P codebook gather + fast Walsh-Hadamard; no LUT format, so its
torch materialize is its fast path and is timed at every shape).
Ratios are to bitsandbytes' NF4 at the same shape, threads and dtype: ``ratio_to_bnb`` <= 1
means lqmod is at least as fast.

Each time is also a fraction of the memory roofline: quantized bytes read + dense bytes
written, over a measured large-copy bandwidth. Writes ``results/kernels_<device>.json``
and a plot. Usage: python benchmarks/bench_kernels.py [--threads 1,2] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

import lqmod
from lqmod.config import LoRAConfig
from lqmod.kernels import select_backend
from lqmod.kernels.reference import REFERENCE
from lqmod.nn.lora_linear import LoRALinear
from lqmod.packing import packed_nbytes
from lqmod.types import QuantizedWeight, QuantizerSpec

SHAPES = {
    "cuda": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "cpu": [(1024, 1024), (4096, 4096), (11008, 4096)],
}
LAYER_SHAPES = {"cuda": [(4096, 4096), (11008, 4096)], "cpu": [(1024, 1024), (2752, 1024)]}
TOKENS = (1, 16, 512)
RANK = 16
# The pure-torch reference takes seconds at LLaMA sizes on 2 cores: timed up to this many
# weights (the speed-up is the same ratio at every size; see results at 1024x1024).
TORCH_MAX_NUMEL = 1 << 22

Step = Callable[[], Any]


# -- timing -------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# "wall" (default) or "cpu": the process's CPU time (every thread's, so at more than one
# thread it counts OpenMP spin-waits too). On a machine shared with other work a
# low-priority process is descheduled for whole scheduler slices inside longer calls; its
# CPU time leaves those out, so at 1 thread it is the closer estimate of the cost on an
# idle machine (it still counts cache and memory-bandwidth contention).
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCK["wall"]


def _once(fn: Step, device: torch.device) -> float:
    start = _clock()
    fn()
    _sync(device)
    return (_clock() - start) * 1e3


def interleaved(steps: dict[str, Step], device: torch.device, reps: int, calls: int) -> dict[str, list[float]]:
    """Per method, the best of ``calls`` timings in each of ``reps`` rounds that run all methods."""
    for fn in steps.values():  # warm-up: compilation, autotuning, first-touch allocation
        fn()
    _sync(device)
    out: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(reps):
        for m, fn in steps.items():
            out[m].append(min(_once(fn, device) for _ in range(calls)))
    return out


def measure_bandwidth(device: torch.device) -> float:
    """GB/s of a large device-to-device copy (read + write counted), best of several."""
    n_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = min(interleaved({"copy": lambda: dst.copy_(src)}, device, 5, 2)["copy"])
    return 2 * n_bytes / (best / 1e3) / 1e9


# -- weights ------------------------------------------------------------------------------

# name -> (quantizer, config, bits): the formats compared on one chart.
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    "nf4": ("nf", {"bits": 4, "blocksize": 64, "double_quant": True}),
    "nf3": ("nf", {"bits": 3, "blocksize": 64, "double_quant": True}),
    "optq4-g128": ("optq", {"bits": 4, "group_size": 128, "sym": False}),
    "optq3-g128": ("optq", {"bits": 3, "group_size": 128, "sym": False}),
    "optq2-g128": ("optq", {"bits": 2, "group_size": 128, "sym": False}),
    "optq4-g128-act": ("optq", {"bits": 4, "group_size": 128, "sym": False, "desc_act": True}),
    "optq4-g32-act": ("optq", {"bits": 4, "group_size": 32, "sym": False, "desc_act": True}),
    "rtn4-g128": ("rtn", {"bits": 4, "group_size": 128, "symmetric": False}),
    # ICQ's LutFormat is its base's with the per-block shift folded into the offsets.
    "icq-nf4": ("icq", {"base": "nf", "base_config": {"bits": 4, "blocksize": 64, "double_quant": True}}),
    # Not a LUT format (an E8P code selects an 8-vector): its pure-torch materialize is its only
    # path, timed at every shape (codebook gather + fast Walsh-Hadamard transforms).
    "quip2": ("quip", {"bits": 2}),
    "quip4": ("quip", {"bits": 4}),
}
# Formats whose torch materialize is their fast path: timed at every shape, not only the small.
TORCH_IS_FAST = {"quip2", "quip4"}


def _random_bytes(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)


def synth_weight(
    fmt: str, shape: tuple[int, int], device: torch.device, seed: int = 0
) -> tuple[QuantizerSpec, QuantizedWeight]:
    """A valid weight of ``fmt`` with random codes, in the quantizer's own tensor layout."""
    name, overrides = FORMATS[fmt]
    spec = lqmod.get_registry().quantizer(name)
    cfg = spec.config_model(**overrides).model_dump(mode="json")
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(seed)
    if name == "icq":
        return spec, _synth_icq(spec, cfg, overrides, shape, device, seed)
    if name == "quip":
        return spec, _synth_quip(cfg, shape, device, gen)
    bits, n = int(cfg["bits"]), out_f * in_f
    t: dict[str, torch.Tensor] = {"codes": _random_bytes(packed_nbytes(n, bits), gen)}
    if name == "nf":
        blocks = n // int(cfg["blocksize"])
        t["absmax_codes"] = _random_bytes(blocks, gen)
        t["absmax_scale"] = torch.rand(-(-blocks // int(cfg["dq_blocksize"])), generator=gen) * 0.1
        t["absmax_offset"] = torch.tensor([0.05])
    else:
        groups = in_f // int(cfg["group_size"])
        t["scales"] = (torch.rand(out_f, groups, generator=gen) * 0.01 + 1e-3).half()
        if not cfg.get("sym", cfg.get("symmetric")):
            t["zeros"] = _random_bytes(packed_nbytes(out_f * groups, bits), gen)
        if cfg.get("desc_act"):
            t["g_idx"] = act_order_g_idx(in_f, int(cfg["group_size"]), gen)
    qweight = QuantizedWeight(name, cfg, shape, {k: v.to(device) for k, v in t.items()}, {}, torch.float32)
    return spec, qweight


def act_order_g_idx(in_f: int, group_size: int, gen: torch.Generator) -> torch.Tensor:
    """GPTQ's act-order g_idx for a random Hessian diagonal: ``g_idx[perm[j]] = j // group_size``.

    ``perm`` (columns by decreasing diagonal) of a real layer is as good as random, so every
    group is ``group_size`` columns scattered over the whole row: the layout a real act-order
    checkpoint has, not a near-identity one.
    """
    perm = torch.randperm(in_f, generator=gen)
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_f) // group_size).int()
    return g_idx


def _synth_icq(
    spec: QuantizerSpec, cfg: dict[str, Any], overrides: dict[str, Any], shape: tuple[int, int],
    device: torch.device, seed: int,
) -> QuantizedWeight:  # fmt: skip
    from lqmod_icq.config import ICQConfig
    from lqmod_icq.quantizer import BASE_PREFIX
    from lqmod_icq.validate import shift_layout

    # The base's weight as the base's own format row synthesises it (same codes, same seed).
    base_fmt = next(k for k, (q, o) in FORMATS.items() if (q, o) == (cfg["base"], overrides["base_config"]))
    _, base = synth_weight(base_fmt, shape, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    layout = shift_layout(ICQConfig.model_validate(cfg), shape)
    n_blocks, n_scales = layout["tau_codes"][0][0], layout["tau_scale"][0][0]
    t = {BASE_PREFIX + k: v for k, v in base.tensors.items()}
    t["tau_codes"] = torch.randint(-127, 128, (n_blocks,), generator=gen, dtype=torch.int8).to(device)
    t["tau_scale"] = (torch.rand(n_scales, generator=gen) * 1e-4).to(device)
    return QuantizedWeight("icq", cfg, shape, t, {"base_meta": base.meta}, torch.float32)


def _synth_quip(
    cfg: dict[str, Any], shape: tuple[int, int], device: torch.device, gen: torch.Generator
) -> QuantizedWeight:
    out_f, in_f = shape
    vectors = (out_f, in_f // 8)
    bits = int(cfg["bits"])
    t = {
        # bits 4: two stacked E8P stages; 3: one, plus 1-bit E8 residual codes; 2: one.
        "codes": torch.randint(-(2**15), 2**15, (2 if bits == 4 else 1, *vectors), generator=gen, dtype=torch.int16),
        "signs": _random_bytes(packed_nbytes(out_f + in_f, 1), gen),
        "scales": torch.tensor([0.02, 0.006][: 1 if bits == 2 else 2], dtype=torch.float32),
    }
    if int(cfg["bits"]) == 3:
        t["resid_codes"] = _random_bytes(out_f * in_f // 8, gen).view(vectors)
    return QuantizedWeight("quip", cfg, shape, {k: v.to(device) for k, v in t.items()}, {}, torch.float32)


def _bnb_nf4(dense: torch.Tensor) -> tuple[torch.Tensor, Any] | None:
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    return bnbf.quantize_4bit(dense, blocksize=64, quant_type="nf4", compress_statistics=True)


# -- materialize --------------------------------------------------------------------------


def materialize_rows(
    shape: tuple[int, int], threads: int, dtype: torch.dtype, device: torch.device, bandwidth: float,
    formats: list[str], reps: int,
) -> list[dict[str, Any]]:  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    dense = (torch.randn(shape, generator=gen) * 0.02).to(device, dtype)
    steps: dict[str, Step] = {"dense/copy": lambda: dense.clone()}
    bnb = _bnb_nf4(dense)
    if bnb is not None:
        import bitsandbytes.functional as bnbf

        packed, state = bnb
        steps["bnb/nf4"] = lambda: bnbf.dequantize_4bit(packed, state)
    sizes: dict[str, int] = {"dense/copy": dense.numel() * dense.element_size()}
    if bnb is not None:
        packed, state = bnb
        sizes["bnb/nf4"] = packed.numel() + math.ceil(dense.numel() / 64) + 4 * math.ceil(dense.numel() / 64 / 256)
    for fmt in formats:
        spec, qw = synth_weight(fmt, shape, device)
        sizes[fmt] = qw.storage_bits() // 8
        backend = select_backend(qw, device, lut_format=spec.lut_format)
        fast = f"{fmt}/lqmod-{backend.name}"
        if backend.name == "native":
            steps[fast] = partial(backend.weight, qw, spec.materialize, dtype)  # type: ignore[attr-defined]
        elif backend.name == "triton":
            from lqmod.kernels.triton.launch import lut_dequant

            steps[fast] = lambda q=qw, s=spec: lut_dequant(s.lut_format(q), dtype)  # type: ignore[misc]
        if dense.numel() <= TORCH_MAX_NUMEL or device.type == "cuda" or fmt in TORCH_IS_FAST:
            steps[f"{fmt}/lqmod-torch"] = partial(spec.materialize, qw, dtype)
    calls = 3 if dense.numel() <= 1 << 22 else 1
    times = interleaved(steps, device, reps, calls)
    bnb_ms = statistics.median(times["bnb/nf4"]) if "bnb/nf4" in times else None
    bnb_min = min(times["bnb/nf4"]) if "bnb/nf4" in times else None
    rows = []
    for key, ts in times.items():
        fmt, method = key.split("/")
        out_bytes = dense.numel() * dense.element_size()
        read = sizes.get(fmt, out_bytes)
        ms = statistics.median(ts)
        ideal = (read + out_bytes) / (bandwidth * 1e9) * 1e3
        rows.append({
            "op": "materialize", "format": fmt, "method": method, "shape": list(shape), "threads": threads,
            "dtype": str(dtype).removeprefix("torch."), "tokens": None, "ms": round(ms, 4),
            "ms_min": round(min(ts), 4), "reps": len(ts), "roofline_frac": round(ideal / ms, 4),
            "ratio_to_bnb": round(ms / bnb_ms, 3) if bnb_ms else None,
            "ratio_min_to_bnb": round(min(ts) / bnb_min, 3) if bnb_min else None,
        })  # fmt: skip
    return rows


# -- LoRA layer forward+backward ----------------------------------------------------------


class _Holder(torch.nn.Module):
    def __init__(self, proj: torch.nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _peft_lora(base: torch.nn.Module) -> torch.nn.Module | None:
    try:
        import peft
    except ImportError:
        return None
    cfg = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=["proj"])
    model = peft.get_peft_model(_Holder(base), cfg)
    return model


def layer_rows(
    shape: tuple[int, int], threads: int, dtype: torch.dtype, device: torch.device, formats: list[str], reps: int
) -> list[dict[str, Any]]:
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(2)
    dense = (torch.randn(shape, generator=gen) * 0.02).to(device, dtype)
    lora = LoRAConfig(r=RANK, alpha=2 * RANK)
    modules: dict[str, torch.nn.Module] = {}
    for fmt in formats:
        spec, qw = synth_weight(fmt, shape, device)
        a = (torch.randn(RANK, in_f, generator=gen) * 0.01).to(device, dtype)
        b = (torch.randn(out_f, RANK, generator=gen) * 0.01).to(device, dtype)
        layer = LoRALinear(qw, spec, lora, lora_a=a, lora_b=b)
        backend = layer.backend(device)
        modules[f"{fmt}/lqmod-{backend.name}"] = layer
        if backend.name != "torch" and dense.numel() <= TORCH_MAX_NUMEL:
            ref = LoRALinear(qw, spec, lora, lora_a=a, lora_b=b)
            # Force the reference path on the frozen base (the layer's backend lives there).
            ref.base_layer._backend, ref.base_layer._backend_device = REFERENCE, device
            modules[f"{fmt}/lqmod-torch"] = ref
    try:
        import bitsandbytes as bnb

        lin4 = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4")
        lin4.weight = bnb.nn.Params4bit(
            dense.detach().cpu(), requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=True
        )
        peft_bnb = _peft_lora(lin4.to(device))
        if peft_bnb is not None:
            modules["bnb/nf4+peft"] = peft_bnb.to(dtype) if device.type == "cpu" else peft_bnb
    except ImportError:
        pass
    lin = torch.nn.Linear(in_f, out_f, bias=False).to(device, dtype)
    lin.weight.data.copy_(dense)
    lin.weight.requires_grad_(False)
    peft_dense = _peft_lora(lin)
    if peft_dense is not None:
        modules["dense/peft"] = peft_dense
    rows = []
    for tokens in TOKENS:
        x = torch.randn(tokens, in_f, generator=gen).to(device, dtype).requires_grad_(True)
        grad_y = torch.randn(tokens, out_f, generator=gen).to(device, dtype)

        def step(m: torch.nn.Module, x: torch.Tensor = x, grad_y: torch.Tensor = grad_y) -> None:
            m(x).backward(grad_y)
            x.grad = None
            for p in m.parameters():
                p.grad = None

        steps: dict[str, Step] = {k: partial(step, m) for k, m in modules.items()}
        times = interleaved(steps, device, reps, 3 if tokens < 512 else 1)
        bnb_ms = statistics.median(times["bnb/nf4+peft"]) if "bnb/nf4+peft" in times else None
        bnb_min = min(times["bnb/nf4+peft"]) if "bnb/nf4+peft" in times else None
        for key, ts in times.items():
            fmt, method = key.split("/")
            ms = statistics.median(ts)
            rows.append({
                "op": "layer_fwd_bwd", "format": fmt, "method": method, "shape": list(shape), "threads": threads,
                "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "ms": round(ms, 4),
                "ms_min": round(min(ts), 4), "reps": len(ts),
                "ratio_to_bnb": round(ms / bnb_ms, 3) if bnb_ms else None,
                "ratio_min_to_bnb": round(min(ts) / bnb_min, 3) if bnb_min else None,
            })  # fmt: skip
    return rows


# -- report -------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'op':<14} {'shape':<11} {'thr':>3} {'tok':>4} {'format':<15} {'method':<13}"
    print(f"\n{head} {'ms':>9} {'min':>9} {'x bnb':>6}")
    for r in rows:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        ratio = f"{r['ratio_to_bnb']:.2f}" if r.get("ratio_to_bnb") else "-"
        tok = r["tokens"] if r["tokens"] else ""
        print(f"{r['op']:<14} {shape:<11} {r['threads']:>3} {tok!s:>4} {r['format']:<15} {r['method']:<13} "
              f"{r['ms']:>9.3f} {r['ms_min']:>9.3f} {ratio:>6}")  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    """The ratio tables of a result: materialize per format, and the LoRA layer."""
    rows = result["results"]
    lines = [
        f"# lqmod kernels on {result['device']} ({result['cpu_capability']}, {result['cpu_count']} cores)",
        "",
        f"Generated by `benchmarks/bench_kernels.py` ({result.get('clock', 'wall')} clock). Each cell: median ms"
        " over interleaved rounds, and in",
        "brackets the ratio to bitsandbytes' NF4 at the same shape, threads and dtype (<= 1: lqmod at least",
        "as fast), then the same ratio of the best rounds (`min`). On a loaded machine a round can lose",
        "whole scheduler slices (wall clock) and a single lucky round sets a min: read both, and where they",
        "disagree by much, the cell measured the load, not the kernel. The JSON records the clock.",
        f"Load average during the runs: {[x['load_average'] for x in result['load_average']][:3]}...",
        "(the machine is shared with other work; see the JSON for every section's load).",
        "",
    ]
    mat = [r for r in rows if r["op"] == "materialize"]
    for dtype in dict.fromkeys(r["dtype"] for r in mat):
        cols = list(dict.fromkeys((tuple(r["shape"]), r["threads"]) for r in mat if r["dtype"] == dtype))
        lines += [f"## materialize, {dtype}", ""]
        lines.append("| format / method | " + " | ".join(f"{s[0]}x{s[1]} {t}thr" for s, t in cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for key in dict.fromkeys((r["format"], r["method"]) for r in mat if r["dtype"] == dtype):
            cells = []
            for s, t in cols:
                hit = [r for r in mat if (r["format"], r["method"]) == key and r["dtype"] == dtype
                       and (tuple(r["shape"]), r["threads"]) == (s, t)]  # fmt: skip
                cells.append(_cell(hit[0], 3) if hit else "-")
            lines.append(f"| {key[0]} / {key[1]} | " + " | ".join(cells) + " |")
        lines.append("")
    lay = [r for r in rows if r["op"] == "layer_fwd_bwd"]
    if lay:
        cols2 = list(dict.fromkeys((tuple(r["shape"]), r["threads"], r["tokens"]) for r in lay))
        lines += [f"## LoRA layer forward+backward (rank {result['lora_rank']}), {lay[0]['dtype']}", ""]
        lines.append("| format / method | " + " | ".join(f"{s[0]}x{s[1]} {t}thr {k}tok" for s, t, k in cols2) + " |")
        lines.append("|---" * (len(cols2) + 1) + "|")
        for key in dict.fromkeys((r["format"], r["method"]) for r in lay):
            cells = []
            for s, t, k in cols2:
                hit = [r for r in lay if (r["format"], r["method"]) == key
                       and (tuple(r["shape"]), r["threads"], r["tokens"]) == (s, t, k)]  # fmt: skip
                cells.append(_cell(hit[0], 2) if hit else "-")
            lines.append(f"| {key[0]} / {key[1]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(row: dict[str, Any], digits: int) -> str:
    text = f"{row['ms']:.{digits}f} ({row['ratio_to_bnb']:.2f}"
    if row.get("ratio_min_to_bnb") is not None:
        text += f"; min {row['ratio_min_to_bnb']:.2f}"
    return text + ")"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mat = [r for r in rows if r["op"] == "materialize" and r["method"] not in ("torch",) and r["ratio_to_bnb"]]
    groups = list(dict.fromkeys((tuple(r["shape"]), r["threads"], r["dtype"]) for r in mat))
    series = list(dict.fromkeys(f"{r['format']}/{r['method']}" for r in mat))
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    ax = axes[0]
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        ys = []
        for g in groups:
            hit = [
                r
                for r in mat
                if (tuple(r["shape"]), r["threads"], r["dtype"]) == g and f"{r['format']}/{r['method']}" == s
            ]
            ys.append(hit[0]["ratio_to_bnb"] if hit else float("nan"))
        ax.bar([j + i * width for j in range(len(groups))], ys, width, label=s)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.5, color="k", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{g[0][0]}x{g[0][1]}\n{g[1]} thr {g[2]}" for g in groups], fontsize=7)
    ax.set_ylabel("time / bitsandbytes NF4 dequantize_4bit")
    ax.set_yscale("log")
    ax.set_title("materialize (lower is faster; 1 = bnb, dashed 1.5)")
    ax.legend(fontsize=6, ncol=2)
    ax = axes[1]
    lay = [r for r in rows if r["op"] == "layer_fwd_bwd"]
    for k, key in enumerate(dict.fromkeys((r["format"], r["method"], tuple(r["shape"]), r["threads"]) for r in lay)):
        pts = [r for r in lay if (r["format"], r["method"], tuple(r["shape"]), r["threads"]) == key]
        ax.plot([r["tokens"] for r in pts], [r["ms"] for r in pts], "o-", color=f"C{k % 10}",
                label=f"{key[0]}/{key[1]} {key[2][0]}x{key[2][1]} {key[3]}thr", lw=1)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("LoRA layer fwd+bwd ms")
    ax.set_title("LoRA layer forward+backward")
    ax.legend(fontsize=5, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _device_label(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default=None, help="comma list; default: bfloat16 on GPU, float32,bfloat16 on CPU")
    ap.add_argument("--threads", default="1,2", help="comma list of torch CPU thread counts (CPU only)")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of: {', '.join(FORMATS)}")
    ap.add_argument("--shapes", default=None, help="comma list of OUTxIN for materialize (default per device)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds per measurement")
    ap.add_argument("--no-layer", action="store_true", help="skip the LoRA layer forward+backward")
    ap.add_argument("--no-materialize", action="store_true", help="skip the materialize sections")
    ap.add_argument("--clock", choices=sorted(CLOCK), default="wall", help="wall time, or the process's CPU time")
    ap.add_argument("--quick", action="store_true", help="one small shape, 2 rounds (smoke test)")
    ap.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth; default: measured with a large copy")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    global _clock
    _clock = CLOCK[args.clock]
    if args.clock == "cpu" and kind == "cuda":
        ap.error("--clock cpu measures host CPU time; on CUDA use the default wall clock")
    formats = [f for f in args.formats.split(",") if f]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        ap.error(f"unknown formats {unknown}; choose from {', '.join(FORMATS)}")
    dtypes = [
        getattr(torch, d) for d in (args.dtypes or ("bfloat16" if kind == "cuda" else "float32,bfloat16")).split(",")
    ]
    threads = [int(t) for t in args.threads.split(",")] if kind == "cpu" else [torch.get_num_threads()]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES[kind]
    layer_shapes = LAYER_SHAPES[kind]
    reps = args.reps
    if args.quick:
        shapes, layer_shapes, reps = [(256, 512)], [(256, 512)], 2
    bandwidth = args.bandwidth_gbs or measure_bandwidth(device)
    label = _device_label(device)
    print(f"device {label}, bandwidth {bandwidth:.1f} GB/s, threads {threads}, load {os.getloadavg()}")
    rows: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = []
    started = time.time()
    for n_threads in threads:
        if kind == "cpu":
            torch.set_num_threads(n_threads)
        for dtype in dtypes if not args.no_materialize else []:
            for shape in shapes:
                load = [round(v, 2) for v in os.getloadavg()]
                new = materialize_rows(shape, n_threads, dtype, device, bandwidth, formats, reps)  # type: ignore[arg-type]
                for r in new:
                    r["load_average"] = load
                rows += new
                loads.append({"section": f"materialize {shape} {n_threads}thr {dtype}", "load_average": load})
                print_table(new)
        if not args.no_layer:
            dtype = dtypes[0]
            for shape in layer_shapes:
                load = [round(v, 2) for v in os.getloadavg()]
                new = layer_rows(shape, n_threads, dtype, device, ["nf4", "optq4-g128"], reps)
                for r in new:
                    r["load_average"] = load
                rows += new
                loads.append({"section": f"layer {shape} {n_threads}thr {dtype}", "load_average": load})
                print_table(new)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "device": label,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bandwidth_gbs": round(bandwidth, 2),
        "threads": threads,
        "reps": reps,
        "clock": args.clock,
        "seconds": round(time.time() - started, 1),
        # Other agents share this machine: every method is timed in every round (interleaved),
        # "ms" is the median over rounds of the best of a few calls, "ms_min" the best round.
        "load_average": loads,
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "versions": _versions(),
        "lora_rank": RANK,
        "formats": {k: {"quantizer": v[0], **v[1]} for k, v in FORMATS.items() if k in formats},
        "roofline": "materialize: (quantized + dense bytes) / measured copy bandwidth",
        "results": rows,
    }
    suffix = ("_quick" if args.quick else "") + ("_cpuclock" if args.clock == "cpu" else "")
    json_path = out / f"kernels_{label}{suffix}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, json_path.with_suffix(".png"), f"lqmod kernels on {label}")
    json_path.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


def _versions() -> dict[str, str]:
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "bitsandbytes", "peft"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    return versions


if __name__ == "__main__":
    raise SystemExit(main())
