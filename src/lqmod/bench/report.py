"""Writing results: a rich table on the terminal, JSON, Markdown tables and matplotlib plots.

Files for model ``M`` under the output folder: ``bench_M.json`` (everything, per-layer rows
included), ``bench_M.md`` (the tables), ``bench_M_error_vs_bits.png``,
``bench_M_fidelity.png`` and, with finetuning, ``bench_M_finetune.png``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "finetune_table",
    "markdown_tables",
    "print_tables",
    "producer_version",
    "quant_table",
    "stamp_version",
    "write_report",
]

QUANT_COLUMNS = (
    "row",
    "source",
    "status",
    "bits/param",
    "weight err",
    "output err",
    "output err max",
    "fidelity",
    "quantize s",
    "quantize peak RSS Δ MiB",
)


def _num(v: Any, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _fid(row: Mapping[str, Any]) -> str:
    f = row.get("fidelity") or {}
    if f.get("metric") == "perplexity":
        return f"ppl {f['value']:.2f}" if f["value"] < 1e4 else f"ppl {f['value']:.3g}"
    if f.get("metric") == "cosine":
        return f"cos {f['value']:.5f} (min {f['min']:.4f})"
    return ""


def quant_table(results: Mapping[str, Any]) -> list[list[str]]:
    """One list of cells per row (status and reason shown for rows that could not run)."""
    ref = results.get("reference", {})
    ref_fid = f"ppl {ref['value']:.2f}" if ref.get("metric") == "perplexity" else "cos 1"
    cells = [["fp32 (unquantized)", "", "reference", "32", "0", "0", "0", ref_fid, "", ""]]
    for r in results["rows"]:
        if r["status"] != "ok":
            cells.append([r["label"], r.get("source", ""), f"{r['status']}: {r.get('reason', '')}", *[""] * 7])
            continue
        peak = r.get("quantize_peak_rss_delta_bytes")
        status = "ok" + (f" ({'; '.join(r['notes'])})" if r.get("notes") else "")
        cells.append(
            [
                r["label"],
                r.get("source", ""),
                status,
                _num(r["bits_per_param"], ".3f"),
                _num(r["w_err"], ".6g"),
                _num(r.get("out_err"), ".6g"),
                _num(r.get("out_err_max"), ".4g"),
                _fid(r),
                _num(r.get("quantize_seconds"), ".1f"),
                _num(None if peak is None else peak / 2**20, ".0f"),
            ]
        )
    return cells


FT_COLUMNS = (
    "method",
    "base",
    "steps",
    "loss first→last",
    "fidelity before→after",
    "saved for backward MiB",
    "peak RSS Δ MiB",
    "resident MiB",
    "s/step",
)


def finetune_table(ft: Mapping[str, Any] | None) -> list[list[str]]:
    if not ft:
        return []
    cells = []
    for r in ft["runs"]:
        if r["status"] != "ok":
            cells.append([r["method"], r["base"], f"{r['status']}: {r.get('reason', '')}", *[""] * 6])
            continue
        fmt = ".2f" if ft["fidelity_metric"] == "perplexity" else ".5f"
        cells.append(
            [
                r["method"],
                r["base"],
                str(r["steps"]),
                f"{r['loss'][0]:.4f}→{r['loss'][-1]:.4f}",
                f"{r['fidelity_before']:{fmt}}→{r['fidelity_after']:{fmt}}",
                _num(r["saved_for_backward_bytes"] / 2**20, ".1f"),
                _num(None if r.get("peak_rss_delta_bytes") is None else r["peak_rss_delta_bytes"] / 2**20, ".0f"),
                _num(r["resident_bytes"] / 2**20, ".1f"),
                _num(r["seconds_per_step"], ".3f"),
            ]
        )
    return cells


def _md(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def producer_version(results: Mapping[str, Any]) -> str:
    """The lqmod version that produced ``results``: the one recorded in them, else this one."""
    from lqmod import __version__

    return str(results.get("lqmod_version") or __version__)


def stamp_version(results: Mapping[str, Any]) -> dict[str, Any]:
    """``results`` with ``lqmod_version`` first. A version already recorded is kept: rewriting
    old results (new tables from an old JSON) must not claim this lqmod produced them."""
    return {"lqmod_version": producer_version(results), **{k: v for k, v in results.items() if k != "lqmod_version"}}


def markdown_tables(results: Mapping[str, Any]) -> str:
    text = f"Results by lqmod {producer_version(results)}.\n\n"
    text += _md(QUANT_COLUMNS, quant_table(results))
    ft = results.get("finetune")
    if ft:
        text += f"\nFinetuning ({ft['objective']}; memory: {ft['memory_note']})\n\n"
        text += _md(FT_COLUMNS, finetune_table(ft))
        notes = [f"- {r['method']}: {n}" for r in ft["runs"] for n in r.get("notes", [])]
        text += ("\nNotes:\n" + "\n".join(notes) + "\n") if notes else ""
    return text


def print_tables(results: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(160, Console().width))
    title = f"lqmod bench: {results['model']['name']} ({results['model']['n_target_layers']} layers)"
    for cols, cells, t in (
        (QUANT_COLUMNS, quant_table(results), title),
        (FT_COLUMNS, finetune_table(results.get("finetune")), "finetuning"),
    ):
        if not cells:
            continue
        table = Table(title=t, show_lines=False)
        for c in cols:
            table.add_column(c, overflow="fold")
        for row in cells:
            table.add_row(*row)
        console.print(table)


def _atomic_write(path: Path, data: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def write_report(results: Mapping[str, Any], out_dir: Path, *, plots: bool = True) -> dict[str, Path]:
    """Write JSON, Markdown and PNG files; returns the paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = stamp_version(results)  # every file written below names the lqmod version
    stem = f"bench_{results['model']['name']}"
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    _atomic_write(paths["json"], json.dumps(results, indent=1, default=_json_default, allow_nan=True) + "\n")
    _atomic_write(paths["md"], markdown_tables(results))
    if plots:
        from lqmod.bench import plots as _plots

        paths.update(_plots.write_plots(results, out_dir, stem))
    return paths
