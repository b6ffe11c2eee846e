"""What the adapters bench measures beside its metric: step-0 outputs, own parameters, clocks, memory,
one layer's forward + backward per variant, and the machine."""

from __future__ import annotations

import copy
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _first_output(model: nn.Module, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**probe)
    return (out[0] if isinstance(out, tuple) else next(iter(out.values()))).float()


def _own_params(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Each variant's parameters beyond LoRA's ``A`` and ``B`` (DoRA's magnitude, IEC's scalars ...), per name."""
    from lqmod.model import iter_lora_layers

    out: dict[str, list[torch.Tensor]] = {}
    for _, layer in iter_lora_layers(model):
        for pname, p in layer.adapter.named_parameters():
            if pname not in ("lora_A", "lora_B"):
                out.setdefault(pname, []).append(p.detach().clone())
    return out


def _moved(before: dict[str, list[torch.Tensor]], after: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    """Mean over layers of mean |p - p0| (and of mean |p0|): how far training moved each own parameter."""
    out = {}
    for pname, olds in before.items():
        news = after[pname]
        change = [float((n - o).abs().mean()) for o, n in zip(olds, news, strict=True)]
        init = [float(o.abs().mean()) for o in olds]
        out[pname] = {"mean_abs_change": sum(change) / len(change), "mean_abs_initial": sum(init) / len(init),
                      "layers": len(olds)}  # fmt: skip
    return out


@contextmanager
def _clock() -> Iterator[dict[str, float]]:
    res: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield res
    finally:
        res["wall_s"] = time.perf_counter() - wall
        res["cpu_s"] = time.process_time() - cpu


def _rss_bytes() -> int | None:
    try:
        from lqmod.bench.peak_rss import current_rss_bytes

        return current_rss_bytes()
    except (OSError, RuntimeError):
        return None


def layer_timing(model: nn.Module, variants: list[str], *, tokens: tuple[int, int] = (4, 128),
                 reps: int = 9) -> dict[str, Any]:  # fmt: skip
    """Forward + backward of the model's largest adapted layer under each variant, interleaved rep
    by rep so machine load hits them alike; median wall seconds (and CPU seconds)."""
    from lqmod.model import iter_lora_layers

    name, layer = max(iter_lora_layers(model), key=lambda kv: kv[1].in_features * kv[1].out_features)
    layers = {}
    for v in variants:
        holder = nn.Sequential(copy.deepcopy(layer))
        from lqmod.model import convert_adapters

        convert_adapters(holder, v)
        layers[v] = holder
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*tokens, layer.in_features, generator=g, requires_grad=True)
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(reps):
        for v, m in layers.items():
            with _clock() as c:
                m(x).sum().backward()
            wall[v].append(c["wall_s"])
            cpu[v].append(c["cpu_s"])

    def med(ts: list[float]) -> float:
        return sorted(ts)[len(ts) // 2]

    return {"layer": name, "shape": [layer.out_features, layer.in_features], "tokens": tokens[0] * tokens[1],
            "reps": reps, "median_s": {v: med(t) for v, t in wall.items()},
            "median_cpu_s": {v: med(t) for v, t in cpu.items()}, "threads": torch.get_num_threads(),
            "loadavg": list(os.getloadavg())}  # fmt: skip


def _environment(load_start: tuple[float, float, float]) -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform(),
            "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg())}  # fmt: skip
