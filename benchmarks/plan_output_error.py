"""Plans from weight-space, output-error and K-FAC tables (issue 11, part 2), on real all-MiniLM-L6-v2.

All tables hold the same options (NF and OPTQ at 2/3/4 bits) quantized once with the same
calibration statistics (WikiText-2 validation sentences: Hessians ``X^T X`` and the diagonal
Fisher of the sentence contrastive loss, on the very same batches); only the error measure
differs: ``frobenius`` = ``||W - Q||^2``, ``fisher`` = ``sum F (W - Q)^2``, ``output`` =
``tr(dW H dW^T) / n``, ``kfac`` = ``sum_i G_i (dW H dW^T)_ii / n`` with ``G_i = n sum_j F_ij /
tr(H)`` (the K-FAC second-order loss change; :mod:`lqmod.allocation.table`). The ILP
allocator picks one option per matrix within the budget. Each plan (and the uniform options
for reference) is then measured on *held-out* sentences: the summed held-out output error
``sum tr(dW G dW^T) / n``, the mean relative layer output error, the end model's mean cosine
similarity of sentence embeddings to the fp32 model's. The JSON also holds the held-out
contrastive loss (the loss the Fisher is taken of), which is *not* a quality measure here: on
batches of adjacent WikiText sentences the fp32 model scores above chance (log 4), and a
model whose embeddings collapse drifts down towards chance.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/plan_output_error.py --budget 3.25 2.75
    python benchmarks/plan_output_error.py --report   # re-render .md and .png from the JSON

Writes benchmarks/results/plan_output_error_minilm.{json,md,png}.

Cost: the table quantizes every option of every matrix once (the four measures are read off
the same quantizations, each cached apart); on the 2 shared CPU cores of issue 11's session
that is ~25-40 min at 1 thread, the Fisher ~5 min (cached in the cache dir as safetensors).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lqmod.allocation.planner import allocate_table
from lqmod.allocation.table import build_model_error_table
from lqmod.bench.fidelity import sentence_embeddings, swapped_weights
from lqmod.calibration import collect_hessians, diagonal_fisher, sentence_contrastive_loss
from lqmod.calibration.text import calibration_batches
from lqmod.config import TargetConfig
from lqmod.hf import load_local_model
from lqmod.model import find_targets
from lqmod.plugins import get_registry
from lqmod.quantize import quantize_weight
from lqmod.types import LayerStats, Option
from lqmod_nf.quantizer import NFConfig
from lqmod_optq.config import OPTQConfig

RESULTS = Path(__file__).parent / "results"
MEASURES = ("frobenius", "fisher", "output", "kfac")


def options() -> list[Option]:
    out = [Option("nf", NFConfig(bits=b, blocksize=64, double_quant=True)) for b in (2, 3, 4)]
    out += [Option("optq", OPTQConfig(bits=b, group_size=64, sym=s)) for b in (2, 3, 4) for s in (True, False)]
    return out


def _weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    weight = model.get_submodule(name).weight
    assert isinstance(weight, torch.Tensor)
    return weight.detach()


def dense_weights(
    model: torch.nn.Module, choice: Mapping[str, Option], stats: Mapping[str, LayerStats]
) -> dict[str, Any]:
    reg = get_registry()
    out = {}
    for name, opt in choice.items():
        spec = reg.quantizer(opt.quantizer)
        w = _weight(model, name)
        qw = quantize_weight(spec, w, opt.config, stats[name], name=name)
        out[name] = (spec.materialize(qw, torch.float32), qw.storage_bits())
    return out


def measure(
    model: torch.nn.Module, dense: Mapping[str, Any], held: Mapping[str, LayerStats], eval_batches: Sequence[Any],
    ref_emb: torch.Tensor,
) -> dict[str, Any]:
    total, rels, bits, numel = 0.0, [], 0, 0
    for name, (q, b) in dense.items():
        w = _weight(model, name).double()
        g = held[name].hessian
        assert g is not None
        d = q.double() - w
        num = float(((d @ g) * d).sum())
        total += num / held[name].n_tokens
        rels.append(math.sqrt(max(num, 0.0) / float(((w @ g) * w).sum())))
        bits += b
        numel += w.numel()
    with torch.inference_mode(), swapped_weights(model, {n: q for n, (q, _) in dense.items()}):
        emb = sentence_embeddings(model, list(eval_batches))
        loss = contrastive_loss(model, eval_batches)
    per_sentence = torch.nn.functional.cosine_similarity(emb.double(), ref_emb.double(), dim=-1)
    return {
        "bits_per_param": bits / numel,
        "heldout_output_error_sum": total,
        "heldout_rel_output_error_mean": sum(rels) / len(rels),
        "embedding_cosine": float(per_sentence.mean()),
        "heldout_contrastive_loss": loss,
        # kept for paired bootstrap intervals between plans (same held-out sentences)
        "embedding_cosine_per_sentence": [round(float(c), 6) for c in per_sentence],
    }


def contrastive_loss(model: torch.nn.Module, batches: Sequence[Any]) -> float:
    """Mean per-pair in-batch contrastive loss over ``batches`` (the Fisher's objective)."""
    losses = [sentence_contrastive_loss(model, b).double() for b in batches]
    return float(torch.cat(losses).mean())


def fisher_cached(
    model: torch.nn.Module, names: Sequence[str], batches: Sequence[Any], path: Path
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of the contrastive loss on ``batches``, kept in ``path`` (safetensors)."""
    from safetensors.torch import load_file, save_file

    if path.is_file():
        loaded = load_file(str(path))
        if set(loaded) == set(names):
            return loaded
    fisher = diagonal_fisher(model, list(names), batches, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({n: t.contiguous() for n, t in fisher.items()}, str(tmp))
    os.replace(tmp, path)
    return fisher


def plot(rows: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    marks = {"frobenius": "o", "fisher": "s", "output": "^", "kfac": "D"}
    for ax, key, title in (
        (axes[0], "embedding_cosine", "embedding cosine to fp32 (higher is better)"),
        (axes[1], "heldout_output_error_sum", "held-out sum of tr(dW G dW^T)/n (lower is better)"),
    ):
        for quant, color in (("nf", "tab:gray"), ("optq", "tab:brown")):
            pts = sorted((r["bits_per_param"], r[key]) for k, r in rows.items() if k.startswith(f"uniform {quant}("))
            ax.plot(*zip(*pts, strict=True), color=color, ls=":", marker=".", label=f"uniform {quant}")
        for measure, m in marks.items():
            pts = [(r["bits_per_param"], r[key]) for k, r in rows.items() if k.endswith(f", {measure} table")]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=m, s=60, label=f"plan, {measure} table", zorder=3)
        ax.set_xlabel("bits/param")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0.0, 1.0)
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2: ILP plans from four error tables, measured on held-out sentences")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def layer_weights(stats: Mapping[str, LayerStats]) -> dict[str, dict[str, float]]:
    """Per matrix: the activation scale tr(H)/n that ``output`` weights by, and the mean of kfac's G_i."""
    out = {}
    for name, s in stats.items():
        assert s.hessian is not None and s.fisher is not None
        scale = float(s.hessian.diagonal().sum()) / s.n_tokens
        out[name] = {"act_scale": scale, "mean_G": float(s.fisher.double().sum(1).mean()) / scale}
    return out


def _kind(name: str) -> str:
    """The layer's role, e.g. ``attention.self.query`` or ``output.dense`` (the layer index dropped)."""
    return re.sub(r"^.*?layer\.\d+\.", "", name)


def _bits(label: str) -> int:
    found = re.search(r"bits=(\d+)", label)
    if found is None:
        raise ValueError(f"option label {label!r} names no bits=")
    return int(found.group(1))


def by_kind_table(payload: Mapping[str, Any]) -> list[str]:
    """Markdown: per layer role, the weights the two measures give it and the bits each plan spends on it."""
    plans = {k: r["choice"] for k, r in payload["rows"].items() if "choice" in r}
    layers = payload.get("layers") or {}
    if not plans or not layers:
        return []
    kinds: dict[str, list[str]] = {}
    for name in layers:
        kinds.setdefault(_kind(name), []).append(name)
    heads = [k.replace("plan ", "").replace(" bits, ", " ").replace(" table", "") for k in plans]
    lines = [
        "mean bits per matrix by layer role (matrices per role in brackets); act = tr(H)/n, the weight the "
        "output measure gives a layer's errors; mean G = kfac's per-output weight",
        "",
        "| layer role | act | mean G | " + " | ".join(heads) + " |",
        "|---|---|---|" + "---|" * len(heads),
    ]
    for kind, names in kinds.items():
        act = sum(layers[n]["act_scale"] for n in names) / len(names)
        g = sum(layers[n]["mean_G"] for n in names) / len(names)
        bits = [sum(_bits(ch[n]) for n in names) / len(names) for ch in plans.values()]
        lines.append(f"| {kind} ({len(names)}) | {act:.3g} | {g:.3g} | " + " | ".join(f"{b:.2f}" for b in bits) + " |")
    return lines


def bootstrap_table(rows: Mapping[str, Any], *, resamples: int = 2000, seed: int = 0) -> list[str]:
    """Markdown: kfac plan minus each other plan at its budget, in mean embedding cosine, with a
    paired bootstrap 95% interval over the held-out sentences (not over calibration draws)."""
    plans = {k: r for k, r in rows.items() if k.startswith("plan ") and "embedding_cosine_per_sentence" in r}
    out = [
        "kfac plan minus other plans at the same budget, mean embedding cosine, paired bootstrap 95% interval "
        f"over held-out sentences ({resamples} resamples; calibration-draw noise not included)",
        "",
        "| budget | vs table | difference | 95% interval |",
        "|---|---|---|---|",
    ]
    gen = torch.Generator().manual_seed(seed)
    for key, row in plans.items():
        if not key.endswith(", kfac table"):
            continue
        mine = torch.tensor(row["embedding_cosine_per_sentence"], dtype=torch.float64)
        idx = torch.randint(0, mine.numel(), (resamples, mine.numel()), generator=gen)
        for other_key, other in plans.items():
            if other_key == key or not other_key.startswith(key.split(", ")[0] + ","):
                continue
            diff = mine - torch.tensor(other["embedding_cosine_per_sentence"], dtype=torch.float64)
            boot = diff[idx].mean(1)
            lo, hi = (float(x) for x in torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)))
            budget = key.split(" ")[1]
            table = other_key.split(", ")[1].replace(" table", "")
            out.append(f"| {budget} | {table} | {float(diff.mean()):+.4f} | [{lo:+.4f}, {hi:+.4f}] |")
    return out if len(out) > 4 else []


def write_report(payload: Mapping[str, Any], out: Path) -> None:
    """The markdown table and the plot of a run's JSON payload."""
    rows = payload["rows"]
    load = " ".join(f"{x:.1f}" for x in payload["load_average"])
    lines = [
        f"{payload['torch_threads']} torch thread(s), niced, load average {load} at the end (2 shared cores); "
        f"table: {sum(payload.get('table_quantized', {}).values())} option x matrix quantized in "
        f"{sum(payload['table_seconds'].values()):.0f} s this run (the rest read from the cache, each quantization "
        "serving all four measures)",
        "",
        "| row | bits/param | held-out sum tr(dW G dW^T)/n | mean rel. layer output err | embedding cosine "
        "| mix (params) |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        mix = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in r.get("by_quantizer", {}).items())
        lines.append(
            f"| {label} | {r['bits_per_param']:.3f} | {r['heldout_output_error_sum']:.4g} | "
            f"{r['heldout_rel_output_error_mean']:.4f} | {r['embedding_cosine']:.5f} | {mix} |"
        )
    lines += ["", *bootstrap_table(rows)]
    by_kind = by_kind_table(payload)
    if by_kind:
        lines += ["", *by_kind]
    (out / "plan_output_error_minilm.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "plan_output_error_minilm.png")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, nargs="+", default=[3.25])
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--n-eval", type=int, default=128)
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/lqmod-plan-cache-kfac"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--report", action="store_true", help="only re-render the .md and .png from the JSON in --out")
    p.add_argument(
        "--skip-uniform", action="store_true",
        help="keep the uniform rows of the JSON already in --out (they do not depend on the table) and "
        "recompute only the plans",
    )
    args = p.parse_args(argv)
    if args.report:
        write_report(json.loads((args.out / "plan_output_error_minilm.json").read_text()), args.out)
        return 0
    torch.manual_seed(0)
    model, tok, where = load_local_model("minilm")
    names = find_targets(model, TargetConfig())
    calib_b = calibration_batches(tok, where.kind, "wikitext2", args.n_calib)
    eval_b = calibration_batches(tok, where.kind, "wikitext2", args.n_eval, offset=args.n_calib)
    t0 = time.time()
    with torch.inference_mode():
        hess = collect_hessians(model, names, calib_b, progress=False)
        held = collect_hessians(model, names, eval_b, progress=False)
        ref_emb = sentence_embeddings(model, eval_b)
        ref_loss = contrastive_loss(model, eval_b)
    # The Fisher on the Hessians' own batches: kfac divides one by the other's mean ||x||^2.
    fisher = fisher_cached(model, names, calib_b, args.cache_dir / f"fisher-minilm-{args.n_calib}.safetensors")
    calib = {n: LayerStats(h.hessian, h.n_tokens, fisher[n], h.act_absmean) for n, h in hess.items()}
    stats_seconds = time.time() - t0
    print(f"statistics: {stats_seconds:.0f} s", flush=True)
    opts = options()
    rows: dict[str, Any] = {}
    tables = {}
    table_seconds: dict[str, float] = {}
    table_quantized: dict[str, int] = {}
    for error in MEASURES:
        t0 = time.time()
        tables[error] = build_model_error_table(
            model, options=opts, stats=calib, cache=args.cache_dir, progress=True, error=error
        )
        table_seconds[error] = time.time() - t0
        table_quantized[error] = tables[error].computed
        print(f"table {error}: {table_seconds[error]:.0f} s ({tables[error].computed} quantized)", flush=True)
    if args.skip_uniform:
        old = json.loads((args.out / "plan_output_error_minilm.json").read_text())["rows"]
        rows.update({k: v for k, v in old.items() if k.startswith("uniform ")})
    for opt in [] if args.skip_uniform else opts:
        dense = dense_weights(model, dict.fromkeys(names, opt), calib)
        rows[f"uniform {opt.label}"] = measure(model, dense, held, eval_b, ref_emb)
        print(f"uniform {opt.label}: {rows[f'uniform {opt.label}']}", flush=True)
    for budget in args.budget:
        for error, table in tables.items():
            plan, summary = allocate_table(table, budget)
            choice = {}
            for name in names:
                entry = plan.modules[name]
                choice[name] = next(
                    o
                    for o in opts
                    if o.quantizer == entry.quantizer and o.config.model_dump(mode="json") == entry.config
                )
            row: dict[str, Any] = dict(measure(model, dense_weights(model, choice, calib), held, eval_b, ref_emb))
            row["mix"] = {
                k: {"matrices": v["matrices"], "params": v["params"]} for k, v in summary["by_option"].items()
            }
            row["by_quantizer"] = {k: v["params"] for k, v in summary["by_quantizer"].items()}
            row["table_total_error"] = summary["total_error"]
            row["choice"] = {name: choice[name].label for name in names}
            rows[f"plan {budget} bits, {error} table"] = row
            print(f"plan {budget} {error}: {row}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": "all-MiniLM-L6-v2",
        "targets": len(names),
        "calibration": f"{args.n_calib} WikiText-2 validation sentences (Hessians and Fisher, same batches of 8)",
        "fisher": "lqmod.calibration.diagonal_fisher, sentence contrastive loss, per pair",
        "held_out": f"the next {args.n_eval} sentences",
        "fp32_heldout_contrastive_loss": ref_loss,
        "options": [o.label for o in opts],
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "statistics_seconds": stats_seconds,
        "table_seconds": table_seconds,
        "table_quantized": table_quantized,
        "uniform_rows": "kept from the previous JSON (--skip-uniform)" if args.skip_uniform else "computed in this run",
        "layers": layer_weights(calib),
        "rows": rows,
    }
    (out / "plan_output_error_minilm.json").write_text(json.dumps(payload, indent=1))
    write_report(payload, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
