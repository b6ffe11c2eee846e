"""Tables (markdown), JSON and plots of ``bench_init.py --part icq`` results, and the claims they check.

The init part's report moved to :mod:`lqmod.bench.init_report` (``lqmod bench init``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lqmod.bench.init_report import env_markdown

__all__ = ["claims_icq", "write_report"]


def _ok(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["label"]: r for r in rows if r.get("status") != "missing"}


def _f(v: Any, fmt: str = ".4f") -> str:
    return "—" if v is None else format(v, fmt)


def claims_icq(results: dict[str, Any]) -> dict[str, Any]:
    rows = _ok(results["rows"])
    out: dict[str, Any] = {}
    for bits in (2, 3, 4):
        for icq_label, plain_label, what in [
            (f"icq-nf{bits} b64", f"nf{bits} b64", "same block (64): icq costs +0.127 bits"),
            (f"icq-nf{bits} b128", f"nf{bits} b64", "equal bits: icq at block 128 vs plain at block 64"),
            (f"icq-nf{bits} b128", f"nf{bits} b128", "same block (128): icq costs +0.063 bits"),
        ]:
            a, b = rows.get(icq_label), rows.get(plain_label)
            if a is None or b is None:
                continue
            sa, sb = a["summary"], b["summary"]
            out[f"{icq_label} vs {plain_label}"] = {
                "what": what,
                "bits": [sa["bits_per_param"], sb["bits_per_param"]],
                "entropy": [sa["entropy"], sb["entropy"]],
                "w_err": [sa["w_err"], sb["w_err"]],
                "out_err": [sa["out_err"], sb["out_err"]],
                "fidelity": [a["fidelity"]["value"], b["fidelity"]["value"]],
            }
    return out


def _table_icq(results: dict[str, Any]) -> str:
    head = ["row", "bits/param", "code entropy (bits)", "weight err", "output err (calib)", "output err (held-out)",
            "cosine", "blocks shifted", "claim violations", "quantize s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        if r.get("status") == "missing":
            lines.append(f"| {r['label']} | " + " | ".join(["missing"] * (len(head) - 1)) + " |")
            continue
        s = r["summary"]
        shifted = f"{r['shifted_blocks'] / r['blocks']:.1%}" if "shifted_blocks" in r else "—"
        cells = [r["label"], _f(s.get("bits_per_param"), ".4f"), _f(s.get("entropy"), ".4f"), _f(s.get("w_err")),
                 _f(s.get("out_err")), _f(s.get("out_err_heldout")), _f(r["fidelity"]["value"], ".5f"), shifted,
                 str(r.get("entropy_violations", "—")), _f(r.get("quantize_seconds"), ".1f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_icq(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("status") != "missing" and r["label"] != "fp"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        s = r["summary"]
        marker = "o" if r["row"]["base"] == "icq" else "s"
        color = "C1" if r["row"]["base"] == "icq" else "C0"
        axes[0].scatter(s["bits_per_param"], s["entropy"], marker=marker, color=color)
        axes[1].scatter(s["bits_per_param"], s["out_err"], marker=marker, color=color)
        for ax, y in ((axes[0], s["entropy"]), (axes[1], s["out_err"])):
            ax.annotate(r["label"], (s["bits_per_param"], y), fontsize=6)
    axes[0].set_ylabel("mean code entropy per block (bits)")
    axes[1].set_ylabel("mean calibrated output error")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("bits per parameter (exact storage)")
    axes[0].scatter([], [], marker="s", color="C0", label="plain NF")
    axes[0].scatter([], [], marker="o", color="C1", label="icq over NF")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['settings']['model']}: ICQ vs plain NF")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path, model: str, part: str) -> None:
    if part != "icq":
        raise ValueError(f"part {part!r}: this report is the icq part's; the init part's is lqmod.bench.init_report")
    out.mkdir(parents=True, exist_ok=True)
    stem = "icq"
    claims = claims_icq(results)
    body = _table_icq(results) + "\n\n```json\n" + json.dumps(claims, indent=1) + "\n```"
    _plot_icq(results, out / f"{stem}.png")
    results = {**results, "claims": claims}
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    missing = [r["label"] for r in results["rows"] if r.get("status") == "missing"]
    header = f"# bench_init: {model} {part}\n\nSettings: `{json.dumps(results['settings'], sort_keys=True)}`\n\n"
    header += env_markdown(results) + "\n\n"
    if missing:
        header += f"**PARTIAL**: missing rows {missing}\n\n"
    (out / f"{stem}.md").write_text(header + body + "\n")
    print(f"wrote {out / stem}.{{json,md,png}}")
