"""Throughput of NF4 materialization and of a LoRA layer's forward+backward.

Compared, on the same NF4 weight (blocksize 64, double quantization, as QLoRA):

* ``lqmod-torch``: the plain-torch reference backend (materialize, matmul, drop);
* ``lqmod-triton`` / ``lqmod-triton-tiled`` (CUDA only): the fused LutFormat kernels, and
  the row-block dequantize kernel + cuBLAS;
* ``bnb``: bitsandbytes' 4-bit path (``dequantize_4bit``; ``Linear4bit`` + the same LoRA);
* ``dense``: a frozen dense ``nn.Linear`` + the same LoRA (materialize: a plain copy).

Each time is also reported as a fraction of the memory-bandwidth roofline: the time the
bytes that *must* move would take at the machine's bandwidth. For ``materialize`` that is
the quantized weight read plus the dense weight written; for a layer forward+backward it is
the quantized weight read twice (forward and backward), activations and FLOPs ignored, so
large token counts are compute-bound and far below 1 by design. The bandwidth is measured
with a large copy unless ``--bandwidth-gbs`` gives it.

Writes ``benchmarks/results/kernels_<device>.json`` and a PNG plot beside it, and prints a
table. Usage: python benchmarks/bench_kernels.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lqmod.autograd import materialized_linear
from lqmod.kernels.base import KernelBackend
from lqmod.kernels.reference import REFERENCE
from lqmod.types import QuantizedWeight
from lqmod_nf.kernel_format import lut_format
from lqmod_nf.quantizer import NFConfig, materialize, quantize

# (out_features, in_features): LLaMA-7B's q/o projections and MLP up/down, and the same
# ratios at a size two CPU cores finish in minutes.
SHAPES = {
    "cuda": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "cpu": [(1024, 1024), (2752, 1024), (1024, 2752)],
}
TOKENS = (1, 16, 512)
RANK = 16

Step = Callable[[], Any]


# -- timing -------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Step, device: torch.device, min_seconds: float, max_reps: int) -> tuple[float, float]:
    """(median, min) wall time of ``fn`` in ms, after a warm-up call (compilation, autotuning).

    The minimum is kept too: on a shared machine it is the better estimate of the code's
    own cost, the median of what a user would see.
    """
    fn()
    _sync(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < 3 or (spent < min_seconds and len(times) < max_reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        spent += times[-1] / 1e3
    return statistics.median(times), min(times)


def measure_bandwidth(device: torch.device) -> float:
    """GB/s of a large device-to-device copy (read + write counted), best of several."""
    n_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = time_ms(lambda: dst.copy_(src), device, 0.5, 20)[1]
    return 2 * n_bytes / (best / 1e3) / 1e9


# -- the compared implementations ---------------------------------------------------------


class Weight:
    """One dense weight and its NF4 encodings: lqmod's and bitsandbytes'."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        dense = (torch.randn(shape, generator=gen) * 0.02).to(device, dtype)
        self.shape, self.dtype, self.device = shape, dtype, device
        self.dense = dense
        self.qweight: QuantizedWeight = quantize(dense, NFConfig(bits=4, blocksize=64, double_quant=True))
        self.quantized_bytes = self.qweight.storage_bits() // 8
        self.bnb = _bnb_weight(dense)


def _bnb_weight(dense: torch.Tensor) -> Any | None:
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    return bnbf.quantize_4bit(dense, blocksize=64, quant_type="nf4", compress_statistics=True)


def materializers(w: Weight) -> dict[str, Step]:
    steps: dict[str, Step] = {"lqmod-torch": lambda: materialize(w.qweight, w.dtype)}
    if w.device.type == "cuda":
        from lqmod.kernels.triton.launch import lut_dequant

        steps["lqmod-triton"] = lambda: lut_dequant(lut_format(w.qweight), w.dtype)
    if w.bnb is not None:
        import bitsandbytes.functional as bnbf

        packed, state = w.bnb
        steps["bnb"] = lambda: bnbf.dequantize_4bit(packed, state)
    steps["dense"] = lambda: w.dense.clone()
    return steps


def layer_steps(w: Weight, tokens: int) -> dict[str, Step]:
    """forward+backward of ``y = x W^T + s (x A^T) B^T`` for each implementation of ``x W^T``."""
    out_f, in_f = w.shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, in_f, generator=gen).to(w.device, w.dtype).requires_grad_(True)
    grad_y = torch.randn(tokens, out_f, generator=gen).to(w.device, w.dtype)
    lora_a = (torch.randn(RANK, in_f, generator=gen) * 0.01).to(w.device, w.dtype).requires_grad_(True)
    lora_b = torch.zeros(out_f, RANK, device=w.device, dtype=w.dtype, requires_grad=True)

    def with_lora(base: Callable[[torch.Tensor], torch.Tensor]) -> Step:
        def step() -> None:
            y = base(x) + 2.0 * ((x @ lora_a.t()) @ lora_b.t())
            y.backward(grad_y)
            x.grad = lora_a.grad = lora_b.grad = None

        return step

    def lqmod(backend: KernelBackend) -> Step:
        return with_lora(lambda t: materialized_linear(t, w.qweight, materialize, backend))

    steps = {"lqmod-torch": lqmod(REFERENCE)}
    if w.device.type == "cuda":
        from lqmod.kernels.triton.backend import TritonLutBackend

        steps["lqmod-triton"] = lqmod(TritonLutBackend(lut_format, strategy="fused"))
        steps["lqmod-triton-tiled"] = lqmod(TritonLutBackend(lut_format, strategy="tiled"))
    bnb_linear = _bnb_linear(w)
    if bnb_linear is not None:
        steps["bnb"] = with_lora(bnb_linear)
    dense = w.dense
    steps["dense"] = with_lora(lambda t: t @ dense.t())
    return steps


def _bnb_linear(w: Weight) -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    out_f, in_f = w.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=w.dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        w.dense.detach().cpu(), requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=True
    )
    layer = layer.to(w.device)
    return layer


# -- the run ------------------------------------------------------------------------------


def run(device: torch.device, dtype: torch.dtype, bandwidth: float, quick: bool) -> list[dict[str, Any]]:
    shapes = SHAPES["cuda" if device.type == "cuda" else "cpu"][: 1 if quick else None]
    budget = 0.05 if quick else (0.5 if device.type == "cuda" else 0.3)
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        w = Weight(shape, dtype, device)
        dense_bytes = w.dense.numel() * w.dense.element_size()
        ideal = (w.quantized_bytes + dense_bytes) / (bandwidth * 1e9) * 1e3
        for method, step in materializers(w).items():
            rows.append(_row("materialize", shape, None, method, time_ms(step, device, budget, 50), ideal))
        ideal = 2 * w.quantized_bytes / (bandwidth * 1e9) * 1e3
        for tokens in TOKENS[:2] if quick else TOKENS:
            for method, step in layer_steps(w, tokens).items():
                rows.append(_row("layer_fwd_bwd", shape, tokens, method, time_ms(step, device, budget, 50), ideal))
        del w
    return rows


def _row(
    op: str, shape: tuple[int, int], tokens: int | None, method: str, times: tuple[float, float], ideal_ms: float
) -> dict[str, Any]:
    ms, ms_min = times
    row = {"op": op, "shape": list(shape), "tokens": tokens, "method": method, "ms": round(ms, 4)}
    row.update(ms_min=round(ms_min, 4), roofline_ms=round(ideal_ms, 4), roofline_frac=round(ideal_ms / ms, 4))
    print(f"  {op:<14} {shape!s:<14} tokens={tokens!s:<5} {method:<20} {ms:9.3f} ms  {ideal_ms / ms:6.1%}")
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    keys = list(dict.fromkeys((r["op"], tuple(r["shape"]), r["tokens"]) for r in rows))
    head = f"{'op':<14} {'shape (out,in)':<15} {'tokens':>6} " + " ".join(f"{m:>22}" for m in methods)
    print("\n" + head + "\n" + "-" * len(head))
    cell = {(r["op"], tuple(r["shape"]), r["tokens"], r["method"]): r for r in rows}
    for op, shape, tokens in keys:
        parts = []
        for m in methods:
            r = cell.get((op, shape, tokens, m))
            parts.append(f"{r['ms']:>10.3f} ms {r['roofline_frac']:>7.1%}" if r else f"{'-':>22}")
        print(f"{op:<14} {f'{shape[0]}x{shape[1]}':<15} {tokens if tokens else '':>6} " + " ".join(parts))
    print("(each cell: median time, fraction of the memory-bandwidth roofline)")


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes), 7), squeeze=False)
    for col, shape in enumerate(shapes):
        mat = [r for r in rows if r["op"] == "materialize" and tuple(r["shape"]) == shape]
        ax = axes[0][col]
        colors = [f"C{methods.index(r['method'])}" for r in mat]
        ax.bar([r["method"] for r in mat], [r["ms"] for r in mat], color=colors)
        ax.set_title(f"materialize {shape[0]}x{shape[1]}")
        ax.set_ylabel("ms")
        ax.tick_params(axis="x", rotation=30)
        ax = axes[1][col]
        for m in methods:
            pts = [r for r in rows if r["op"] == "layer_fwd_bwd" and tuple(r["shape"]) == shape and r["method"] == m]
            if pts:
                ax.plot([r["tokens"] for r in pts], [r["ms"] for r in pts], "o-", color=f"C{methods.index(m)}", label=m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("fwd+bwd ms")
        ax.set_title(f"LoRA layer {shape[0]}x{shape[1]}")
        ax.legend(fontsize=7)
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
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth; default: measured with a large copy")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="one shape, two token counts, short timings")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    bandwidth = args.bandwidth_gbs or measure_bandwidth(device)
    label = _device_label(device)
    print(f"device {label}, dtype {dtype}, bandwidth {bandwidth:.1f} GB/s, threads {torch.get_num_threads()}")
    rows = run(device, dtype, bandwidth, args.quick)
    print_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "device": label,
        "dtype": str(dtype).removeprefix("torch."),
        "bandwidth_gbs": round(bandwidth, 2),
        "bandwidth_source": "cli" if args.bandwidth_gbs else "measured copy (read + write)",
        "threads": torch.get_num_threads(),
        # Other work on a shared machine inflates the medians; ms_min is the robust figure.
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "versions": _versions(),
        "lora_rank": RANK,
        "weight": "NF4, blocksize 64, double quantization",
        "roofline": "materialize: (quantized + dense bytes) / bandwidth; "
        "layer_fwd_bwd: 2 x quantized bytes / bandwidth",
        "results": rows,
    }
    json_path = out / f"kernels_{label}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, out / f"kernels_{label}.png", f"lqmod kernels on {label} ({result['dtype']})")
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


def _versions() -> dict[str, str]:
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "bitsandbytes"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    return versions


if __name__ == "__main__":
    raise SystemExit(main())
