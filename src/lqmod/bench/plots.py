"""Matplotlib plots of a benchmark result (Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["png_metadata", "short_label", "write_plots"]


def short_label(row: Mapping[str, Any]) -> str:
    """A compact point label, e.g. ``nf b4 g64`` or ``bnb-nf4 g64 dq``."""
    cfg = row.get("config", {})
    parts = [row["name"]]
    if "bits" in cfg:
        parts.append(f"b{cfg['bits']}")
    for key in ("blocksize", "group_size"):
        if key in cfg:
            parts.append(f"g{cfg[key]}")
    if cfg.get("double_quant"):
        parts.append("dq")
    if "rank" in cfg:
        parts.append(f"r{cfg['rank']}")
    return " ".join(parts)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_metadata(results: Mapping[str, Any]) -> dict[str, str]:
    """PNG text chunks naming the lqmod version that produced the numbers (see report.py)."""
    from lqmod.bench.report import producer_version

    return {"Software": f"lqmod {producer_version(results)}"}


def _ok(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [r for r in results["rows"] if r["status"] == "ok"]


def error_vs_bits(results: Mapping[str, Any], path: Path) -> None:
    plt = _plt()
    rows = _ok(results)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, title in zip(
        axes, ("w_err", "out_err"), ("weight error ‖Ŵ−W‖/‖W‖", "layer output error ‖XŴᵀ−XWᵀ‖/‖XWᵀ‖"), strict=True
    ):
        for r in rows:
            if r.get(key) is None:
                continue
            lq = r["kind"] == "lqmod"
            ax.scatter(
                r["bits_per_param"],
                r[key],
                marker="o" if lq else "^",
                s=60 if lq else 50,
                color="tab:blue" if lq else "tab:orange",
                edgecolor="black",
                linewidth=0.5,
                zorder=3,
            )
            ax.annotate(
                short_label(r), (r["bits_per_param"], r[key]), fontsize=7, xytext=(4, 3), textcoords="offset points"
            )
        ax.set_yscale("log")
        ax.set_xlabel("storage bits per parameter (metadata included)")
        ax.set_title(f"{title}, mean over layers", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].scatter([], [], marker="o", color="tab:blue", label="lqmod plug-in")
    axes[0].scatter([], [], marker="^", color="tab:orange", label="baseline package")
    axes[0].legend(loc="upper right")
    fig.suptitle(f"{results['model']['name']}: error vs storage cost", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=png_metadata(results))
    plt.close(fig)


def fidelity_bars(results: Mapping[str, Any], path: Path) -> None:
    plt = _plt()
    rows = [r for r in _ok(results) if r.get("fidelity")]
    if not rows:
        return
    ppl = rows[0]["fidelity"]["metric"] == "perplexity"
    value = (lambda r: r["fidelity"]["value"]) if ppl else (lambda r: max(1 - r["fidelity"]["value"], 1e-9))
    rows = sorted(rows, key=value)
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(rows) + 1.6))
    colors = ["tab:blue" if r["kind"] == "lqmod" else "tab:orange" for r in rows]
    labels = [f"{short_label(r)} ({r['bits_per_param']:.2f} b/p)" for r in rows]
    ax.barh(range(len(rows)), [value(r) for r in rows], color=colors, edgecolor="black", linewidth=0.4)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    if ppl:
        ref = results["reference"]["value"]
        ax.axvline(ref, color="black", linestyle="--", linewidth=1, label=f"fp32 {ref:.2f}")
        ax.set_xscale("log")
        ax.set_xlabel("perplexity on held-out WikiText-2 (lower is better)")
        ax.legend()
    else:
        ax.set_xscale("log")
        ax.set_xlabel("1 − cosine similarity of sentence embeddings to fp32 (lower is better)")
    ax.set_title(f"{results['model']['name']}: end-model fidelity (blue: lqmod, orange: baselines)", fontsize=10)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=png_metadata(results))
    plt.close(fig)


def finetune_plot(results: Mapping[str, Any], path: Path) -> None:
    plt = _plt()
    ft = results.get("finetune") or {}
    runs = [r for r in ft.get("runs", []) if r["status"] == "ok"]
    if not runs:
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    for r in runs:
        ax.plot(range(1, len(r["loss"]) + 1), r["loss"], label=f"{r['method']} ({r['base']})", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ft.get("loss_name", "loss"))
    ax.set_title(ft.get("objective", ""), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    names = [f"{r['method']}\n{r['base']}" for r in runs]
    ax2.bar(names, [r["saved_for_backward_bytes"] / 2**20 for r in runs], color="tab:gray", edgecolor="black")
    ax2.set_ylabel("MiB saved for backward (peak step)")
    ax2.tick_params(axis="x", labelsize=7)
    ax2.set_title("activation memory kept for backward", fontsize=9)
    fig.suptitle(f"{results['model']['name']}: LoRA finetuning on the quantized model", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=png_metadata(results))
    plt.close(fig)


def write_plots(results: Mapping[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    paths = {
        "error_vs_bits": out_dir / f"{stem}_error_vs_bits.png",
        "fidelity": out_dir / f"{stem}_fidelity.png",
    }
    error_vs_bits(results, paths["error_vs_bits"])
    fidelity_bars(results, paths["fidelity"])
    if results.get("finetune"):
        paths["finetune"] = out_dir / f"{stem}_finetune.png"
        finetune_plot(results, paths["finetune"])
    return {k: p for k, p in paths.items() if p.exists()}
