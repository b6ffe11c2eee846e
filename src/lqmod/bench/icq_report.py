"""Tables, pairings and the plot of ``lqmod bench icq`` (:mod:`lqmod.bench.icq`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["pairings", "write_report"]


def _ok(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["label"]: r for r in rows if r.get("status") != "missing"}


def _f(v: Any, fmt: str = ".4f") -> str:
    return "—" if v is None else format(v, fmt)


def pairings(results: dict[str, Any]) -> dict[str, Any]:
    """Every wrapper row against the plain base at the same block and, at equal bits, at half the block."""
    rows = _ok(results["rows"])
    out: dict[str, Any] = {}
    for label, a in rows.items():
        cfg = a["row"]["base_config"]
        if "base_config" not in cfg or " b" not in label:
            continue
        tag, block = label.split("-", 1)[1].rsplit(" b", 1)
        b_w = int(block)
        for plain_label, what in [
            (f"{tag} b{b_w}", f"same block ({b_w}): the wrapper costs +{8 / b_w + 32 / (256 * b_w):.4f} bits"),
            (f"{tag} b{b_w // 2}", f"equal bits: the wrapper at block {b_w} vs plain at block {b_w // 2}"),
        ]:
            b = rows.get(plain_label)
            if b is None:
                continue
            sa, sb = a["summary"], b["summary"]
            out[f"{label} vs {plain_label}"] = {
                "what": what,
                "bits": [sa["bits_per_param"], sb["bits_per_param"]],
                "entropy": [sa.get("entropy"), sb.get("entropy")],
                "w_err": [sa["w_err"], sb["w_err"]],
                "out_err": [sa["out_err"], sb["out_err"]],
                "fidelity": [a["fidelity"]["value"], b["fidelity"]["value"]],
            }
    return out


def _table(results: dict[str, Any]) -> str:
    lm = results["settings"]["kind"] == "causal-lm"
    head = ["row", "bits/param", "code entropy (bits)", "weight err", "output err (calib)"]
    head += [] if lm else ["output err (held-out)"]
    head += ["perplexity" if lm else "cosine", "blocks shifted", "claim violations", "quantize s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        if r.get("status") == "missing":
            lines.append(f"| {r['label']} | " + " | ".join(["missing"] * (len(head) - 1)) + " |")
            continue
        s = r["summary"]
        shifted = f"{r['shifted_blocks'] / r['blocks']:.1%}" if "shifted_blocks" in r and r["blocks"] else "—"
        cells = [r["label"], _f(s.get("bits_per_param")), _f(s.get("entropy")), _f(s.get("w_err"))]
        cells += [_f(s.get("out_err"))]
        cells += [] if lm else [_f(s.get("out_err_heldout"))]
        cells += [_f(r["fidelity"]["value"], ".3f" if lm else ".5f"), shifted, str(r.get("entropy_violations", "—")),
                  _f(r.get("quantize_seconds"), ".1f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _env_md(results: dict[str, Any]) -> str:
    envs = [r["env"] for r in results["rows"] if "env" in r]
    if not envs:
        return ""
    loads = [e["load_average"][0] for e in envs]
    threads = sorted({e["torch_threads"] for e in envs})
    return (
        f"Measured {envs[0]['time_utc']} .. {envs[-1]['time_utc']} on {envs[0]['cpu_count']} CPUs, torch threads "
        f"{threads}, 1-min load average {min(loads):.1f} .. {max(loads):.1f} at row starts (shared machine)."
    )


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm = results["settings"]["kind"] == "causal-lm"
    rows = [r for r in results["rows"] if r.get("status") != "missing" and r["row"]["base"] != "fp"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in rows:
        s = r["summary"]
        wrapped = "base_config" in r["row"]["base_config"]
        style = {"marker": "o" if wrapped else "s", "color": "C1" if wrapped else "C0"}
        fid = r["fidelity"]["value"]
        for ax, y in ((axes[0], s.get("entropy")), (axes[1], s["out_err"]), (axes[2], fid if lm else 1 - fid)):
            if y is None:
                continue
            ax.scatter(s["bits_per_param"], y, **style)
            ax.annotate(r["label"], (s["bits_per_param"], y), fontsize=6)
    axes[0].set_ylabel("mean code entropy per block (bits)")
    axes[1].set_ylabel("mean calibrated output error")
    axes[2].set_ylabel("perplexity (WikiText-2 test)" if lm else "1 - cosine to fp embeddings")
    for ax in axes[1:]:
        ax.set_yscale("log")
    fp = next((r for r in results["rows"] if r.get("label") == "fp" and r.get("status") != "missing"), None)
    if lm and fp is not None:
        axes[2].axhline(fp["fidelity"]["value"], color="k", lw=1, ls="--", label="fp")
    for ax in axes:
        ax.set_xlabel("bits per parameter (exact storage)")
    axes[0].scatter([], [], marker="s", color="C0", label="plain base (NF / RTN)")
    axes[0].scatter([], [], marker="o", color="C1", label="wrapper (icq) over the same base")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['settings']['model']}: entropy-raising shift (ICQ) vs the plain base")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    claims = pairings(results)
    results = {**results, "claims": claims}
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    _plot(results, out / f"{stem}.png")
    missing = [r["label"] for r in results["rows"] if r.get("status") == "missing"]
    header = f"# lqmod bench icq: {results['settings']['model']}\n\n"
    header += f"Settings: `{json.dumps(results['settings'], sort_keys=True)}`\n\n" + _env_md(results) + "\n\n"
    if missing:
        header += f"**PARTIAL**: missing rows {missing}\n\n"
    body = _table(results) + "\n\n```json\n" + json.dumps(claims, indent=1) + "\n```"
    (out / f"{stem}.md").write_text(header + body + "\n")
