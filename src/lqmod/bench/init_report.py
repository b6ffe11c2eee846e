"""Tables (Markdown), JSON and a plot of ``lqmod bench init`` results, and the claims they check.

Rows are labelled ``"<base> <initializer>"``. Per base, every initializer row is compared layer
by layer with the reference initializer's row (``results["report"]["reference"]``, the CLI's
``--reference``) and with each ``versus`` row: on how many layers its calibrated output error
is lower and by how much; for causal LMs also the fraction of the reference's perplexity gap
to fp it closes. Rows of one initializer under different configs (e.g. two solvers) are
compared with each other: the largest per-layer relative difference of their output errors.
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path
from typing import Any

__all__ = ["claims_init", "env_markdown", "write_report"]


def _ok(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["label"]: r for r in rows if r.get("status") != "missing"}


def _f(v: Any, fmt: str = ".4f") -> str:
    return "—" if v is None else format(v, fmt)


def _split(label: str) -> tuple[str, str]:
    tag, _, init = label.partition(" ")
    return tag, init


def _groups(rows: dict[str, dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for label in rows:
        tag = _split(label)[0]
        if tag != "fp" and tag not in seen:
            seen.append(tag)
    return seen


def _inits(rows: dict[str, dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for label in rows:
        init = _split(label)[1]
        if init and init not in seen:
            seen.append(init)
    return seen


def _key(label: str) -> str:
    return label.replace("-", "_").replace("+", "_")


def _errs(row: dict[str, Any]) -> dict[str, float]:
    return {x["name"]: x["out_err"] for x in row["layers"]}


def _reduction(mine: dict[str, float], ref: dict[str, float]) -> dict[str, float]:
    red = [1 - mine[n] / ref[n] for n in ref]
    return {"min": min(red), "median": statistics.median(red), "max": max(red)}


def claims_init(results: dict[str, Any]) -> dict[str, Any]:
    """Per base: every initializer vs the reference and the ``versus`` rows, and same-initializer gaps."""
    report = results.get("report", {})
    reference, versus = report.get("reference", "default"), list(report.get("versus", ()))
    rows = _ok(results["rows"])
    out: dict[str, Any] = {}
    fp = rows.get("fp", {}).get("fidelity", {}).get("value")
    for tag in _groups(rows):
        base = rows.get(f"{tag} {reference}")
        if base is None:
            continue
        entry: dict[str, Any] = {}
        ref = _errs(base)
        for init in _inits(rows):
            r = rows.get(f"{tag} {init}")
            if r is None or init == reference:
                continue
            mine = _errs(r)
            e: dict[str, Any] = {
                f"vs_{_key(reference)}_layers_below": sum(mine[n] < ref[n] for n in ref),
                "n_layers": len(ref),
                f"vs_{_key(reference)}_reduction": _reduction(mine, ref),
            }
            for other in versus:
                o = rows.get(f"{tag} {other}")
                if other != init and o is not None:
                    oe = _errs(o)
                    e[f"vs_{_key(other)}_layers_below"] = sum(mine[n] < oe[n] for n in ref)
                    e[f"vs_{_key(other)}_reduction"] = _reduction(mine, oe)
            if fp is not None and r["fidelity"]["metric"] == "perplexity":
                gap = base["fidelity"]["value"] - fp
                e["ppl_gap_closed"] = (base["fidelity"]["value"] - r["fidelity"]["value"]) / gap if gap else None
            entry[init] = e
        # Same initializer, different configs (e.g. an iterative and a closed-form solver).
        by_name: dict[str, list[str]] = {}
        for init in _inits(rows):
            r = rows.get(f"{tag} {init}")
            if r is not None:
                by_name.setdefault(r["row"]["init"], []).append(init)
        for labels in by_name.values():
            for a, b in itertools.pairwise(labels):
                ea, eb = _errs(rows[f"{tag} {a}"]), _errs(rows[f"{tag} {b}"])
                entry[f"{a}_vs_{b}_max_rel_gap"] = max(abs(ea[n] / eb[n] - 1) for n in eb)
        out[tag] = entry
    return out


def _table(results: dict[str, Any]) -> str:
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


def _claims_md(results: dict[str, Any], claims: dict[str, Any]) -> str:
    report = results.get("report", {})
    reference, versus = report.get("reference", "default"), list(report.get("versus", ()))
    head = ["base", "initializer", f"layers below {reference}", f"reduction vs {reference} (min / median / max)"]
    for v in versus:
        head += [f"layers below {v}", f"reduction vs {v} (min / median / max)"]
    head.append("ppl gap closed")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pair(e: dict[str, Any], other: str) -> list[str]:
        k = _key(other)
        if f"vs_{k}_layers_below" not in e:
            return ["—", "—"]
        rd = e[f"vs_{k}_reduction"]
        below = f"{e[f'vs_{k}_layers_below']}/{e['n_layers']}"
        return [below, f"{rd['min']:.1%} / {rd['median']:.1%} / {rd['max']:.1%}"]

    gaps = []
    for tag, entry in claims.items():
        for init, e in entry.items():
            if not isinstance(e, dict):
                gaps.append(f"{tag} {init.removesuffix('_max_rel_gap').replace('_vs_', ' vs ')}: {e:.2e}")
                continue
            cells = [tag, init, *pair(e, reference)]
            for v in versus:
                cells += pair(e, v)
            gap = e.get("ppl_gap_closed")
            cells.append("—" if gap is None else f"{gap:.1%}")
            lines.append("| " + " | ".join(cells) + " |")
    note = "Same initializer, different configs: largest per-layer relative difference of the output error: "
    return "\n".join(lines) + "\n\n" + note + (", ".join(gaps) or "—")


def env_markdown(results: dict[str, Any]) -> str:
    envs = [r["env"] for r in results["rows"] if "env" in r]
    if not envs:
        return ""
    loads = [e["load_average"][0] for e in envs]
    threads = sorted({e["torch_threads"] for e in envs})
    times = sorted(e["time_utc"] for e in envs)
    return (
        f"Measured {times[0]} .. {times[-1]} on {envs[0]['cpu_count']} CPUs, torch threads "
        f"{threads}, 1-min load average {min(loads):.1f} .. {max(loads):.1f} at row starts (shared machine)."
    )


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _ok(results["rows"])
    tags, inits = _groups(rows), _inits(rows)
    lm = results["settings"]["kind"] == "causal-lm"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(len(inits), 1)
    for i, init in enumerate(inits):
        xs, errs, fids = [], [], []
        for j, tag in enumerate(tags):
            r = rows.get(f"{tag} {init}")
            if r is None:
                continue
            xs.append(j + (i - (len(inits) - 1) / 2) * width)
            errs.append(r["summary"]["out_err"])
            fids.append(r["fidelity"]["value"])
        if not xs:
            continue
        axes[0].bar(xs, errs, width, label=init, color=f"C{i}")
        axes[1].bar(xs, [(f if lm else 1 - f) for f in fids], width, label=init, color=f"C{i}")
    for ax in axes:
        ax.set_xticks(range(len(tags)), tags)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("mean calibrated output error (step 0)")
    fp = rows.get("fp")
    if lm:
        axes[1].set_ylabel("perplexity (WikiText-2 test)")
        if fp:
            axes[1].axhline(fp["fidelity"]["value"], color="k", lw=1, ls="--", label="fp")
            axes[1].legend(fontsize=8)
    else:
        axes[1].set_ylabel("1 - cosine to fp embeddings")
    rank = results["settings"].get("rank")
    fig.suptitle(f"{results['settings']['model']}: step-0 LoRA initialization over quantized bases (r={rank})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path, model: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"init_{model}"
    claims = claims_init(results)
    _plot(results, out / f"{stem}.png")
    results = {**results, "claims": claims}
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    missing = [r["label"] for r in results["rows"] if r.get("status") == "missing"]
    header = f"# bench_init: {model} init\n\nSettings: `{json.dumps(results['settings'], sort_keys=True)}`\n\n"
    header += env_markdown(results) + "\n\n"
    if missing:
        header += f"**PARTIAL**: missing rows {missing}\n\n"
    body = _table(results) + "\n\n" + _claims_md(results, claims)
    (out / f"{stem}.md").write_text(header + body + "\n")
    print(f"wrote {out / stem}.{{json,md,png}}")
