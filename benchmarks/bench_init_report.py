"""Tables (markdown), JSON and plots of ``bench_init.py`` results, and the claims they check."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

__all__ = ["claims_icq", "claims_init", "write_report"]


def _ok(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["label"]: r for r in rows if r.get("status") != "missing"}


def _f(v: Any, fmt: str = ".4f") -> str:
    return "—" if v is None else format(v, fmt)


def _groups(rows: dict[str, dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for label in rows:
        tag = label.split(" ")[0]
        if tag != "fp" and tag not in seen:
            seen.append(tag)
    return seen


def claims_init(results: dict[str, Any]) -> dict[str, Any]:
    """Per base/bits: on how many layers quailora's calibrated output error is below default's
    and lq-lora's, by how much (relative reduction per layer), the ALS vs exact gap, and (LMs)
    the fraction of the quantized -> fp perplexity gap each initializer closes."""
    rows = _ok(results["rows"])
    out: dict[str, Any] = {}
    fp = rows.get("fp", {}).get("fidelity", {}).get("value")
    for tag in _groups(rows):
        base = rows.get(f"{tag} default")
        if base is None:
            continue
        entry: dict[str, Any] = {}
        ref = {r["name"]: r["out_err"] for r in base["layers"]}
        for other in ("lq-lora", "quailora", "quailora-exact", "lq-lora+quailora"):
            r = rows.get(f"{tag} {other}")
            if r is None:
                continue
            mine = {x["name"]: x["out_err"] for x in r["layers"]}
            red = [1 - mine[n] / ref[n] for n in ref]
            e: dict[str, Any] = {
                "vs_default_layers_below": sum(mine[n] < ref[n] for n in ref),
                "n_layers": len(ref),
                "vs_default_reduction": {"min": min(red), "median": statistics.median(red), "max": max(red)},
            }
            lq = rows.get(f"{tag} lq-lora")
            if other != "lq-lora" and lq is not None:
                lqe = {x["name"]: x["out_err"] for x in lq["layers"]}
                red_lq = [1 - mine[n] / lqe[n] for n in ref]
                e["vs_lq_lora_layers_below"] = sum(mine[n] < lqe[n] for n in ref)
                e["vs_lq_lora_reduction"] = {"min": min(red_lq), "median": statistics.median(red_lq),
                                             "max": max(red_lq)}  # fmt: skip
            fid = r["fidelity"]["value"]
            if fp is not None and r["fidelity"]["metric"] == "perplexity":
                gap = base["fidelity"]["value"] - fp
                e["ppl_gap_closed"] = (base["fidelity"]["value"] - fid) / gap if gap else None
            entry[other] = e
        als, exact = rows.get(f"{tag} quailora"), rows.get(f"{tag} quailora-exact")
        if als and exact:
            a = {x["name"]: x["out_err"] for x in als["layers"]}
            entry["als_vs_exact_max_rel_gap"] = max(abs(a[x["name"]] / x["out_err"] - 1) for x in exact["layers"])
        out[tag] = entry
    return out


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


def _table_init(results: dict[str, Any]) -> str:
    rows = results["rows"]
    lm = results["settings"]["kind"] == "causal-lm"
    head = ["row", "bits/param", "weight err", "output err (calib)"]
    head += [] if lm else ["output err (held-out)"]
    head += ["worst layer out err", "perplexity" if lm else "cosine", "init s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("status") == "missing":
            lines.append(f"| {r['label']} | " + " | ".join(["missing"] * (len(head) - 1)) + " |")
            continue
        s = r["summary"]
        fid = r["fidelity"]["value"]
        cells = [r["label"], _f(s.get("bits_per_param"), ".3f"), _f(s.get("w_err")), _f(s.get("out_err"))]
        cells += [] if lm else [_f(s.get("out_err_heldout"))]
        cells += [_f(s.get("out_err_max")), _f(fid, ".2f" if lm else ".5f"), _f(r.get("init_seconds"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _claims_md_init(claims: dict[str, Any]) -> str:
    lines = ["| base | initializer | layers below default | reduction vs default (min / median / max) |"
             " layers below lq-lora | reduction vs lq-lora (min / median / max) | ppl gap closed |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for tag, entry in claims.items():
        for init, e in entry.items():
            if not isinstance(e, dict):
                continue
            rd = e["vs_default_reduction"]
            rl = e.get("vs_lq_lora_reduction")
            lq = f"{e['vs_lq_lora_layers_below']}/{e['n_layers']}" if "vs_lq_lora_layers_below" in e else "—"
            rls = f"{rl['min']:.1%} / {rl['median']:.1%} / {rl['max']:.1%}" if rl else "—"
            gap = e.get("ppl_gap_closed")
            lines.append(
                f"| {tag} | {init} | {e['vs_default_layers_below']}/{e['n_layers']} | "
                f"{rd['min']:.1%} / {rd['median']:.1%} / {rd['max']:.1%} | {lq} | {rls} | "
                f"{'—' if gap is None else f'{gap:.1%}'} |"
            )
    gaps = [f"{t}: {e['als_vs_exact_max_rel_gap']:.2e}" for t, e in claims.items() if "als_vs_exact_max_rel_gap" in e]
    note = "ALS (20 iterations) vs exact, largest per-layer relative difference of the output error: "
    return "\n".join(lines) + "\n\n" + note + (", ".join(gaps) or "—")


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


def _plot_init(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _ok(results["rows"])
    tags = _groups(rows)
    inits = ["default", "lq-lora", "quailora", "quailora-exact", "lq-lora+quailora"]
    lm = results["settings"]["kind"] == "causal-lm"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.16
    for i, init in enumerate(inits):
        xs, errs, fids = [], [], []
        for j, tag in enumerate(tags):
            r = rows.get(f"{tag} {init}")
            if r is None:
                continue
            xs.append(j + (i - 2) * width)
            errs.append(r["summary"]["out_err"])
            fids.append(r["fidelity"]["value"])
        if not xs:
            continue
        axes[0].bar(xs, errs, width, label=init, color=f"C{i}")
        axes[1].bar(xs, [(f if lm else 1 - f) for f in fids], width, label=init, color=f"C{i}")
    for ax in axes:
        ax.set_xticks(range(len(tags)), tags)
    axes[0].set_ylabel("mean calibrated output error (step 0)")
    axes[0].set_yscale("log")
    fp = rows.get("fp")
    if lm:
        axes[1].set_ylabel("perplexity (WikiText-2 test)")
        axes[1].set_yscale("log")
        if fp:
            axes[1].axhline(fp["fidelity"]["value"], color="k", lw=1, ls="--", label="fp")
    else:
        axes[1].set_ylabel("1 - cosine to fp embeddings")
        axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{results['settings']['model']}: step-0 LoRA initialization over quantized bases (r={16})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    out.mkdir(parents=True, exist_ok=True)
    stem = f"init_{model}" if part == "init" else "icq"
    if part == "init":
        claims = claims_init(results)
        body = _table_init(results) + "\n\n" + _claims_md_init(claims)
        _plot_init(results, out / f"{stem}.png")
    else:
        claims = claims_icq(results)
        body = _table_icq(results) + "\n\n```json\n" + json.dumps(claims, indent=1) + "\n```"
        _plot_icq(results, out / f"{stem}.png")
    results = {**results, "claims": claims}
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    missing = [r["label"] for r in results["rows"] if r.get("status") == "missing"]
    header = f"# bench_init: {model} {part}\n\nSettings: `{json.dumps(results['settings'], sort_keys=True)}`\n\n"
    header += _env_md(results) + "\n\n"
    if missing:
        header += f"**PARTIAL**: missing rows {missing}\n\n"
    (out / f"{stem}.md").write_text(header + body + "\n")
    print(f"wrote {out / stem}.{{json,md,png}}")
