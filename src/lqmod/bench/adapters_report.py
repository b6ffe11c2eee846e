"""Markdown, JSON and a plot of ``lqmod bench adapters`` results (:mod:`lqmod.bench.adapters`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["markdown", "write_report"]


def _mib(v: Any) -> str:
    return "—" if v is None else f"{v / 2**20:.0f}"


def _fmt_metric(metric: str, v: float) -> str:
    return f"{v:.2f}" if metric == "perplexity" else f"{v:.5f}"


def markdown(r: dict[str, Any]) -> str:
    s, env, metric = r["settings"], r["environment"], r["metric"]
    lines = [
        f"# Adapter variants after the same finetuning budget: {r['model']['name']}",
        "",
        f"Objective: {r['objective']}. Every variant: rank {r['lora']['r']}, alpha {r['lora']['alpha']:g}, the same "
        f"initial A and B (B = 0), {s['steps']} steps x {s['batch']} sequences, lr {s['lr']:g} (AdamW), "
        f"seed {s['seed']}, fp32. Metric: {metric}.",
        "",
        *([] if r.get("complete", True) else ["**PARTIAL**: the run stopped before its last base.", ""]),
        f"| base | bits/param | variant | {metric} before | {metric} after | change | trainable params | "
        "peak RSS MiB (growth) | saved for backward MiB | train CPU s | train wall s | first loss | last loss | "
        "step-0 max diff |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in r["bases"]:
        before = b["metric_before"]
        for name, v in b["variants"].items():
            after = v["metric_after"]
            lines.append(
                f"| {b['base']} | {b['bits_per_param']:.3f} | {name} | {_fmt_metric(metric, before)} | "
                f"{_fmt_metric(metric, after)} | {after - before:+.5f} | {v['trainable_params']:,} | "
                f"{_mib(v['train_peak_rss_bytes'])} ({_mib(v['train_peak_rss_delta_bytes'])}) | "
                f"{_mib(v.get('saved_for_backward_bytes'))} | "
                f"{v['train_cpu_s']:.0f} | {v['train_wall_s']:.0f} | {v['loss'][0]:.4f} | {v['loss'][-1]:.4f} | "
                f"{v['step0_max_output_diff']:.1e} |"
            )
    notes = []
    for b in r["bases"]:
        for name, v in b["variants"].items():
            for pname, m in v.get("own_params", {}).items():
                notes.append(f"{b['base']} {name}: `{pname}` moved by mean |change| {m['mean_abs_change']:.3g} "
                             f"from mean |initial| {m['mean_abs_initial']:.3g} ({m['layers']} layers).")  # fmt: skip
        lt = b.get("layer_timing")
        if lt:
            ref = next(iter(lt["median_cpu_s"].values()))
            rel = ", ".join(f"{v} {t * 1e3:.0f} ms ({t / ref:.2f}x)" for v, t in lt["median_cpu_s"].items())
            notes.append(f"{b['base']}: forward + backward of {lt['layer']} ({lt['shape'][0]} x {lt['shape'][1]}) on "
                         f"{lt['tokens']} tokens, median CPU time of {lt['reps']} interleaved reps at "
                         f"{lt['threads']} thread(s), load {lt['loadavg'][0]:.1f}: {rel}.")  # fmt: skip
    lines += ["", *(f"- {n}" for n in notes), ""]
    lines.append(
        f"Threads {env['threads']} of {env['cpu_count']} CPUs (OMP_NUM_THREADS={env['OMP_NUM_THREADS']}); "
        f"1-min load average {env['loadavg_start'][0]:.1f} at the start, {env['loadavg_end'][0]:.1f} at the end "
        "(shared machine: wall times are inflated; CPU times are process CPU seconds). "
        "Peak RSS: the process's high-water mark during training (reset at its start), growth in brackets; "
        "saved for backward: peak bytes autograd saved in one step, parameters excluded (encoders). "
        f"Total {r['seconds']:.0f} s; torch {env['torch']}."
    )
    return "\n".join(lines) + "\n"


def _plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = r["bases"]
    fig, axes = plt.subplots(1, len(bases) + 1, figsize=(4.2 * (len(bases) + 1), 3.8), squeeze=False)
    for ax, b in zip(axes[0], bases, strict=False):
        for i, (name, v) in enumerate(b["variants"].items()):
            ax.plot(range(1, len(v["loss"]) + 1), v["loss"], label=name, color=f"C{i}", lw=1)
        ax.set_title(b["base"], fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    width = 0.8 / max(len(r["variants"]), 1)
    lm = r["metric"] == "perplexity"
    for i, name in enumerate(r["variants"]):
        xs = [j + (i - (len(r["variants"]) - 1) / 2) * width for j in range(len(bases))]
        ys = [b["variants"][name]["metric_after"] for b in bases]
        ax.bar(xs, ys if lm else [1 - y for y in ys], width, label=name, color=f"C{i}")
    before = [b["metric_before"] for b in bases]
    ax.scatter(range(len(bases)), before if lm else [1 - y for y in before], marker="_", s=400, color="k",
               label="step 0", zorder=3)  # fmt: skip
    ax.set_xticks(range(len(bases)), [b["base"].split(",")[0] for b in bases], fontsize=7)
    ax.set_ylabel(r["metric"] if lm else "1 - cosine to fp32 (held out)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.suptitle(f"{r['model']['name']}: adapter variants after {r['settings']['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(r: dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(r, indent=1))
    (out / f"{name}.md").write_text(markdown(r))
    _plot(r, out / f"{name}.png")
