"""The summary files: ``finetune_lm.json``, the markdown table and (with matplotlib) the plots."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lqmod.bench.finetune_lm.plots import _plt, plot_loss_curves, plot_ppl_vs_bits
from lqmod.bench.finetune_lm.rows import ROWS
from lqmod.bench.finetune_lm.settings import FULL, QUICK
from lqmod.bench.finetune_lm.store import _atomic_write, _dump

COLUMNS = ("row", "initializer", "bits/param", "ppl before", "ppl after", "Δ ppl", "train peak RSS Δ MiB",
           "tokens/s", "model MiB", "quantize s", "status")  # fmt: skip


def _f(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return format(v, fmt)


def table_cells(results: Mapping[str, Any]) -> list[list[str]]:
    cells = []
    for r in results["rows"]:
        spec = r.get("spec", {})
        if r["status"] != "ok":
            cells.append([r["row"], spec.get("initializer", ""), "", "", "", "", "", "", "", "",
                          f"{r['status']}: {r.get('reason', '')}"])
            continue
        build = r.get("build", {})
        build_s = build.get("quantize_seconds")
        cells.append([
            r["row"], spec.get("initializer", ""), _f(r["bits_per_param"], ".3f"), _f(r["ppl_before"], ".2f"),
            _f(r["ppl_after"], ".2f"), _f(r["ppl_after"] - r["ppl_before"], "+.2f"),
            _f((r["peak_rss_delta_bytes"] or 0) / 2**20 if r["peak_rss_delta_bytes"] is not None else None, ".0f"),
            _f(r["tokens_per_s"], ".0f" if r["tokens_per_s"] >= 100 else ".3g"), _f(r["resident_bytes"] / 2**20, ".0f"),
            _f(build_s, ".0f") + (" (cached)" if build.get("cached") else ""), "ok",
        ])  # fmt: skip
    return cells


def markdown(results: Mapping[str, Any]) -> str:
    s = results["settings"]
    lines = [f"# Finetuning benchmark: {s['model']} ({s['name']} settings)", ""]
    if results["partial"]:
        lines += [f"**PARTIAL**: {len(results['rows'])} of {len(ROWS)} rows; missing: "
                  f"{', '.join(results['missing'])}.", ""]
    base = QUICK if s["name"].startswith("quick") else FULL
    changed = {k: v for k, v in s.items() if k != "name" and base.describe().get(k) != v}
    if changed:
        lines += [f"Settings: `{base.name.upper()}` with " + ", ".join(f"{k}={v}" for k, v in changed.items())
                  + ".", ""]
    lines += [f"Results by lqmod {results['lqmod_version']}.", ""]
    for k, v in results["protocol"].items():
        lines.append(f"- {k}: {v}")
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table_cells(results)]
    plans = [r for r in results["rows"] if r["status"] == "ok" and r.get("build", {}).get("plan")]
    if plans:
        lines += ["", "Plans (share of the quantized parameters by quantizer):", ""]
        for r in plans:
            p = r["build"]["plan"]
            total = sum(v["params"] for v in p["by_quantizer"].values()) or 1
            mix = ", ".join(f"{q} {v['params'] / total:.0%}" for q, v in p["by_quantizer"].items())
            lines.append(f"- {r['row']}: {p['achieved_bits_per_param']:.3f} bits/param ({p['error_measure']} "
                         f"error table): {mix}")
            by_option = p.get("by_option") or {}
            counted = sorted(by_option.items(), key=lambda kv: -kv[1].get("params", 0))
            if counted:
                lines.append("  - options: " + ", ".join(
                    f"{label} {v.get('params', 0) / total:.0%}" for label, v in counted if v.get("params")))
    loads = [x for r in results["rows"] if r["status"] == "ok"
             for x in (r.get("load_average") or {}).values()]  # fmt: skip
    threads = sorted({r["torch_threads"] for r in results["rows"] if r.get("torch_threads")})
    if loads:
        lo, hi = min(v[0] for v in loads), max(v[0] for v in loads)
        lines += ["", f"Machine while training: torch threads {threads}, 1-minute load average {lo:.1f}-{hi:.1f} "
                  f"(tokens/s falls with the load; rows are comparable only at similar load)."]
    return "\n".join(lines) + "\n"

def write_outputs(results: Mapping[str, Any], out: str | os.PathLike[str], *, plots: bool = True) -> dict[str, Path]:
    """``finetune_lm.json``, ``finetune_lm.md`` and (with matplotlib) the two plots under ``out``."""
    out = Path(out)
    paths = {"json": out / "finetune_lm.json", "md": out / "finetune_lm.md"}
    _atomic_write(paths["json"], _dump(results))
    _atomic_write(paths["md"], markdown(results))
    if plots:
        try:
            _plt()
        except ImportError:
            return paths
        paths["ppl_vs_bits"] = out / "ppl_vs_bits.png"
        paths["loss_curves"] = out / "loss_curves.png"
        plot_ppl_vs_bits(results, paths["ppl_vs_bits"])
        plot_loss_curves(results, paths["loss_curves"])
    return paths
