"""The two plots: perplexity against bits per parameter, and the training loss curves."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, version: str) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": f"lqmod {version}"})
    os.replace(tmp, path)


# The zoomed panel's range: the rows a user would train (fp32 is 37.5 on this protocol).
_ZOOM = (30.0, 200.0)


def _draw_ppl(ax: Any, ok: list[Mapping[str, Any]], zoom: bool) -> None:
    colors = {"default": "tab:blue", "lq-lora": "tab:red"}
    for r in ok:
        x, spec = r["bits_per_param"], r["spec"]
        if spec["kind"] == "fp-lora":
            ax.axhline(r["ppl_before"], color="black", ls=":", lw=1, label=f"fp32 {r['ppl_before']:.1f}")
            ax.axhline(r["ppl_after"], color="black", ls="--", lw=1, label=f"fp32 + LoRA {r['ppl_after']:.1f}")
            continue
        c = "tab:orange" if spec["kind"] == "bnb" else colors.get(spec["initializer"], "tab:gray")
        before = r["ppl_before"]
        if zoom and before > _ZOOM[1]:
            before = _ZOOM[1]  # the arrow enters from the top edge; the hollow marker is off the panel
        else:
            ax.scatter([x], [before], facecolors="none", edgecolors=c, s=45, zorder=3)
        ax.scatter([x], [r["ppl_after"]], color=c, s=45, zorder=3, edgecolor="black", linewidth=0.4)
        ax.annotate("", (x, r["ppl_after"]), (x, before),
                    arrowprops={"arrowstyle": "->", "color": c, "lw": 0.8, "alpha": 0.7})
        if not zoom or _ZOOM[0] <= r["ppl_after"] <= _ZOOM[1]:
            ax.annotate(r["row"], (x, r["ppl_after"]), fontsize=7, xytext=(4, -3), textcoords="offset points")
    ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)


def plot_ppl_vs_bits(results: Mapping[str, Any], path: Path) -> None:
    """Perplexity before (hollow) and after (filled) finetuning against storage bits per parameter:
    every row on a log scale (left), and the usable range zoomed (right)."""
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, NullLocator, ScalarFormatter

    plt = _plt()
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    fig, (ax_all, ax_zoom) = plt.subplots(1, 2, figsize=(14, 5.5))
    _draw_ppl(ax_all, ok, zoom=False)
    _draw_ppl(ax_zoom, ok, zoom=True)
    # Decades only: minor-tick labels of a range spanning 1e1..1e10 overlap into a smear.
    ax_all.yaxis.set_major_locator(LogLocator(base=10, numticks=12))
    ax_all.yaxis.set_minor_formatter(NullFormatter())
    ax_zoom.set_ylim(*_ZOOM)
    ax_zoom.yaxis.set_major_locator(FixedLocator([30, 40, 50, 60, 80, 100, 150, 200]))
    ax_zoom.yaxis.set_major_formatter(ScalarFormatter())
    ax_zoom.yaxis.set_minor_locator(NullLocator())
    for label, c in (("default init", "tab:blue"), ("lq-lora init", "tab:red"), ("bnb + PEFT", "tab:orange")):
        ax_all.scatter([], [], color=c, label=label)
    ax_all.scatter([], [], facecolors="none", edgecolors="gray", label="before finetuning")
    ax_all.scatter([], [], color="gray", label="after finetuning")
    for ax in (ax_all, ax_zoom):
        ax.set_xlabel("storage bits per parameter of the quantized linears (metadata included)")
    ax_all.set_ylabel(f"perplexity, {results['settings']['eval_tokens']} held-out tokens")
    ax_all.set_title("every row")
    ax_zoom.set_title(f"perplexity {_ZOOM[0]:.0f}-{_ZOOM[1]:.0f}")
    fig.suptitle(f"{results['settings']['model']}: perplexity before -> after "
                 f"{results['settings']['steps']} LoRA steps" + (" (PARTIAL)" if results["partial"] else ""))
    ax_all.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    _save(fig, path, results["lqmod_version"])
    plt.close(fig)


def plot_loss_curves(results: Mapping[str, Any], path: Path) -> None:
    """Training loss per step; left: default initializer and baselines, right: lq-lora."""
    plt = _plt()
    ok = [r for r in results["rows"] if r["status"] == "ok" and r.get("loss")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, which in zip(axes, ("default", "lq-lora"), strict=True):
        for r in ok:
            if r["spec"]["initializer"] != which:
                continue
            style = "--" if r["spec"]["kind"] in ("bnb", "fp-lora") else "-"
            ax.plot(range(1, len(r["loss"]) + 1), r["loss"], style, lw=1.2, label=r["row"])
        ax.set_title(f"{which} initializer" + (" (+ baselines)" if which == "default" else ""), fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("training loss (nats/token)")
    fig.suptitle(f"{results['settings']['model']}: LoRA finetuning loss" + (" (PARTIAL)" if results["partial"] else ""))
    fig.tight_layout()
    _save(fig, path, results["lqmod_version"])
    plt.close(fig)
