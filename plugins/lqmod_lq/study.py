"""Error against total bits on real weights: lq options against the plain-NF error curve.

``python -m lqmod_lq.study --layers 0,1,2,3,4,5 --json out.json`` prints, for every layer type
of all-MiniLM-L6-v2, each lq option's relative error next to the plain-NF curve at the same
total bits (factors counted). The curve is the lower convex hull of every NF option
(bits 2/3/4 x block sizes x double quantization on/off): linear interpolation between hull
points is what mixing two NF options across matrices achieves, so a point below it is a
real gain, not an artefact of a sparse grid of NF options.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lqmod.plugins import get_registry
from lqmod.quantize import QuantizationError, quantize_weight
from lqmod_lq.quantizer import LQConfig
from lqmod_nf import NFConfig

__all__ = ["LAYER_TYPES", "curve_at", "lower_hull", "measure", "summarise"]

LAYER_TYPES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def lower_hull(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of (bits, error) points, sorted by bits, error decreasing."""
    pareto: list[tuple[float, float]] = []
    for b, e in sorted(points):
        if not pareto or e < pareto[-1][1]:
            pareto.append((b, e))
    hull: list[tuple[float, float]] = []
    for p in pareto:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # Drop the middle point when it lies on or above the chord to p.
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def curve_at(hull: Sequence[tuple[float, float]], bits: float) -> float | None:
    """The hull's error at ``bits`` (linear interpolation), None outside its range."""
    if not hull or bits < hull[0][0] or bits > hull[-1][0]:
        return None
    for (x1, y1), (x2, y2) in itertools.pairwise(hull):
        if x1 <= bits <= x2:
            return y1 + (y2 - y1) * (bits - x1) / (x2 - x1)
    return hull[-1][1]


def _rel(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.double() - exact.double()).norm() / exact.double().norm())


def measure(
    weights: dict[str, torch.Tensor], lq_configs: Sequence[dict[str, Any]], *, progress: bool = True
) -> list[dict[str, Any]]:
    """One row per (matrix, option): quantizer, label, bits per parameter, relative error."""
    registry = get_registry()
    nf, lq = registry.quantizer("nf"), registry.quantizer("lq")
    rows: list[dict[str, Any]] = []
    for name, w in tqdm(weights.items(), desc="matrices", disable=not progress):
        w = w.float()
        for opt in nf.options():
            assert isinstance(opt, NFConfig)
            try:
                qw = quantize_weight(nf, w, opt, name=name)
            except QuantizationError:
                continue  # a block size this matrix cannot take
            label = f"nf{opt.bits} bs{opt.blocksize} dq{int(opt.double_quant)}"
            err = _rel(nf.materialize(qw, torch.float32), w)
            rows.append({"matrix": name, "q": "nf", "label": label, "bits": qw.bits_per_param(), "err": err})
        for cfg in lq_configs:
            qw = quantize_weight(lq, w, cfg, name=name)
            c = LQConfig.model_validate(cfg)
            label = f"lq nf{c.base_config['bits']} r{c.rank} {c.factor_dtype}"
            err = _rel(lq.materialize(qw, torch.float32), w)
            rows.append({"matrix": name, "q": "lq", "label": label, "bits": qw.bits_per_param(), "err": err,
                         "iterations": qw.meta["iterations"]})  # fmt: skip
    return rows


def _layer_type(name: str) -> str:
    # "encoder.layer.3.attention.output.dense.weight" -> "attention.output.dense"
    return name.split(".", 3)[3].removesuffix(".weight")


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per lq label and layer type: bits, mean error over layers, and the NF hull at those bits."""
    out: dict[str, dict[str, dict[str, float | None]]] = defaultdict(dict)
    for t in LAYER_TYPES:
        sel = [r for r in rows if _layer_type(r["matrix"]) == t]
        by_option: dict[tuple[str, str, float], list[float]] = defaultdict(list)
        for r in sel:
            by_option[(r["q"], r["label"], r["bits"])].append(r["err"])
        hull = lower_hull((b, sum(v) / len(v)) for (q, _, b), v in by_option.items() if q == "nf")
        for (q, label, bits), errs in by_option.items():
            if q == "lq":
                err = sum(errs) / len(errs)
                out[label][t] = {"bits": bits, "err": err, "nf_curve": curve_at(hull, bits)}
    return dict(out)


def _markdown(summary: dict[str, dict[str, dict[str, float | None]]]) -> str:
    header = "| lq option | " + " | ".join(LAYER_TYPES) + " | mean err / curve |"
    lines = [header, "|---" * (len(LAYER_TYPES) + 2) + "|"]
    for label, per_type in summary.items():
        cells, ratios = [], []
        for t in LAYER_TYPES:
            d = per_type[t]
            curve = d["nf_curve"]
            assert d["bits"] is not None and d["err"] is not None
            if curve is None:
                cells.append(f"{d['bits']:.2f}b {d['err']:.4f} (off curve)")
                continue
            ratios.append(d["err"] / curve)
            mark = "below" if d["err"] < curve else "ABOVE"
            cells.append(f"{d['bits']:.2f}b {d['err']:.4f} vs {curve:.4f} {mark}")
        mean = f"{sum(ratios) / len(ratios):.3f}" if ratios else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from safetensors.torch import load_file

    from lqmod.hf import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="0,5", help="encoder layers to use, comma separated")
    parser.add_argument("--ranks", default="4,8,16")
    parser.add_argument("--factors", default="int8,bf16")
    parser.add_argument("--json", type=Path, default=None, help="write the raw rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    state = load_file(str(resolve_model("minilm").path / "model.safetensors"))
    layers = [int(x) for x in args.layers.split(",")]
    names = [f"encoder.layer.{i}.{t}.weight" for i in layers for t in LAYER_TYPES]
    weights = {n: state[n] for n in names}
    configs = [
        {"base_config": {"bits": b, "blocksize": 64}, "rank": r, "factor_dtype": f}
        for f in args.factors.split(",") for b in (2, 3) for r in (int(x) for x in args.ranks.split(","))
    ]  # fmt: skip
    rows = measure(weights, configs)
    if args.json is not None:
        fd, tmp = tempfile.mkstemp(dir=args.json.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, args.json)
    print(_markdown(summarise(rows)))


if __name__ == "__main__":
    main()
