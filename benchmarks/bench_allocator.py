"""Budget allocation on real all-MiniLM-L6-v2: ILP vs greedy vs every uniform configuration.

1. Error table of every target matrix of MiniLM (37 matrices, 10.8M parameters) over every
   option of every registered quantizer (cached under $LQMOD_CACHE / ~/.cache/lqmod). Options
   needing a Hessian get one from WikiText-2 calibration sentences (``--n-calib``); the error
   is Fisher-weighted when ``lqmod.calibration.diagonal_fisher`` exists (``--fisher auto``).
2. For a grid of budgets (avg bits/param), the "ilp" and "greedy" allocator plug-ins; every
   uniform configuration (one option for all matrices) as a point.
3. Must-show at 3.25 and 2.75 bits: the ILP plan's total error is below that of every uniform
   configuration within the budget, and not above greedy's.
4. ILP solve time on a synthetic 1000-matrix x 30-option table.

Writes benchmarks/results/allocator_minilm.json and .png (atomically).

Usage: python benchmarks/bench_allocator.py [--quantizers nf,rtn,lq] [--fisher auto|on|off]
       [--n-calib 128] [--cache-dir DIR] [--out benchmarks/results] [--no-progress]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MUST_SHOW = (3.25, 2.75)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # results are committed: not mkstemp's private 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def registry_with_allocators() -> Any:
    """The default registry; "ilp"/"greedy" registered by hand where their entry points are not installed."""
    import lqmod_alloc_greedy
    import lqmod_alloc_ilp
    from lqmod.plugins import get_registry

    reg = get_registry()
    have = reg.allocators()
    for name, module in (("ilp", lqmod_alloc_ilp), ("greedy", lqmod_alloc_greedy)):
        if name not in have:
            reg.register(module, name=name, distribution="lqmod (plugins/, by hand)")
    return reg


def calibration_stats(
    model: Any, tokenizer: Any, names: list[str], n_calib: int, fisher: str, progress: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Hessians (X^T X) for every target, and a diagonal Fisher when available; plus a description."""
    from lqmod.bench.calib import capture_grams
    from lqmod.data import wikitext_sentences
    from lqmod.types import LayerStats

    texts = wikitext_sentences()[:n_calib]
    batches = [
        dict(tokenizer(texts[i : i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
        for i in range(0, len(texts), 16)
    ]
    grams, counts = capture_grams(model, names, batches, progress=progress)
    fishers: dict[str, torch.Tensor] | None = None
    note = "off"
    if fisher != "off":
        try:
            from lqmod.calibration import diagonal_fisher
        except ImportError as exc:
            if fisher == "on":
                raise SystemExit(f"--fisher on: lqmod.calibration.diagonal_fisher unavailable ({exc})") from None
            note = f"unavailable ({exc}); errors are unweighted Frobenius"
        else:
            fishers = diagonal_fisher(model, names, batches, progress=progress)
            note = "lqmod.calibration.diagonal_fisher"
    stats = {
        n: LayerStats(hessian=grams[n], n_tokens=counts[n], fisher=None if fishers is None else fishers[n])
        for n in names
    }
    return stats, {"calibration_sentences": len(texts), "tokens": counts[names[0]], "fisher": note}


def synthetic_problem(n_matrices: int, n_options: int, seed: int) -> Any:
    """A table shaped like a real one: bits ~ b * numel (+ group metadata), error ~ numel * 4^-b * noise."""
    from lqmod.config import QuantizerConfig
    from lqmod.types import AllocationProblem, Candidate, Option

    class Synthetic(QuantizerConfig):
        k: int = 0

    rng = random.Random(seed)
    opts = [Option("synthetic", Synthetic(k=k)) for k in range(n_options)]
    candidates, numel = {}, {}
    for m in range(n_matrices):
        n = rng.choice([384, 768, 1024, 2048]) * rng.choice([384, 1024, 1536, 4096])
        sens = rng.lognormvariate(0, 1.0)
        rows = []
        for k, opt in enumerate(opts):
            b = 2 + (k % 7) * 0.5 + rng.random() * 0.1
            meta = rng.choice([0.0, 0.125, 0.25, 0.5])
            bits = int(n * (b + meta))
            err = sens * n * 4.0 ** (-b) * (1 - 0.3 * meta) * rng.uniform(0.8, 1.2)
            rows.append(Candidate(opt, err, bits))
        candidates[f"m{m}"] = rows
        numel[f"m{m}"] = n
    n_params = sum(numel.values())
    return AllocationProblem(candidates, int(3.25 * n_params), numel)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2))
    colors = {
        "nf": "tab:blue",
        "rtn": "tab:orange",
        "lq": "tab:green",
        "lq-fisher": "tab:olive",
        "optq": "tab:purple",
        "quip": "tab:brown",
    }
    seen: set[str] = set()
    right = max(results["budgets"]) + 0.25
    for u in (u for u in results["uniform"] if u["bits_per_param"] <= right):
        q = u["quantizer"]
        ax.scatter(
            u["bits_per_param"],
            u["total_error"],
            s=14,
            color=colors.get(q, "tab:gray"),
            alpha=0.7,
            label=f"uniform {q}" if q not in seen else None,
        )
        seen.add(q)
    for name, style in (("ilp", "k-"), ("greedy", "r--")):
        pts = [(c["achieved_bits_per_param"], c["total_error"]) for c in results["curve"][name]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, lw=1.4, label=f"{name} (mixed per matrix)")
    for b in MUST_SHOW:
        ax.axvline(b, color="gray", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("average bits per parameter (exact storage)")
    ax.set_ylabel(f"total error ({results['error_weighting']})")
    ax.set_title(f"MiniLM-L6: allocated plans vs uniform configs ({results['n_matrices']} matrices)")
    ax.set_xlim(min(results["budgets"]) - 0.1, right)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    _atomic_write(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantizers", default=None, help="comma-separated (default: every registered quantizer)")
    p.add_argument("--fisher", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--n-calib", type=int, default=128, help="WikiText-2 sentences for Hessians (and Fisher)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", default="", help="suffix of the result files: allocator_minilm<tag>.json/.png")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from lqmod.allocation import allocate_table, build_model_error_table
    from lqmod.allocation.options import parse_quantizer_list
    from lqmod.config import TargetConfig
    from lqmod.hf import load_local_model
    from lqmod.model import find_targets
    from lqmod_alloc_ilp import ILPConfig
    from lqmod_alloc_ilp import allocate as ilp

    progress = not args.no_progress
    reg = registry_with_allocators()
    model, tokenizer, where = load_local_model("minilm")
    names = find_targets(model, TargetConfig())
    t0 = time.perf_counter()
    stats, calib = calibration_stats(model, tokenizer, names, args.n_calib, args.fisher, progress)
    calib["seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = build_model_error_table(
        model,
        quantizers=parse_quantizer_list(args.quantizers),
        stats=stats,
        cache=args.cache_dir,
        registry=reg,
        progress=progress,
    )
    table_seconds = time.perf_counter() - t0
    n = table.n_params
    uniform: list[dict[str, Any]] = [
        {
            "option": label,
            "quantizer": label.split("(", 1)[0],
            "bits": bits,
            "bits_per_param": bits / n,
            "total_error": err,
        }
        for label, (err, bits) in sorted(table.uniform().items(), key=lambda kv: kv[1][1])
    ]
    low = sum(min(c.bits for c in r) for r in table.candidates.values()) / n
    grid = sorted({*MUST_SHOW, *(round(low + 0.005 + 0.125 * k, 4) for k in range(40) if low + 0.125 * k <= 5.5)})
    curve: dict[str, list[dict[str, Any]]] = {"ilp": [], "greedy": []}
    plans: dict[str, Any] = {}
    for b in grid:
        for alloc in ("ilp", "greedy"):
            plan, s = allocate_table(table, b, allocator=alloc, registry=reg)
            curve[alloc].append(
                {
                    "budget": b,
                    "achieved_bits_per_param": s["achieved"]["bits_per_param"],
                    "total_error": s["total_error"],
                    "solve_seconds": s["solve_seconds"],
                    "status": s["status"],
                    "gap": s["gap"],
                }
            )
            if b in MUST_SHOW:
                plans[f"{alloc}@{b}"] = {"summary": s, "modules": {k: v.model_dump() for k, v in plan.modules.items()}}

    checks: dict[str, dict[str, Any]] = {}
    for b in MUST_SHOW:
        i_err = plans[f"ilp@{b}"]["summary"]["total_error"]
        g_err = plans[f"greedy@{b}"]["summary"]["total_error"]
        budget_bits = plans[f"ilp@{b}"]["summary"]["budget"]["bits"]
        fitting = [u for u in uniform if u["bits"] <= budget_bits]
        best = min(fitting, key=lambda u: u["total_error"]) if fitting else None
        checks[str(b)] = {
            "ilp_error": i_err,
            "greedy_error": g_err,
            "best_uniform": best,
            "uniform_within_budget": len(fitting),
            "ilp_below_every_uniform": all(i_err < u["total_error"] for u in fitting),
            "ilp_not_worse_than_greedy": i_err <= g_err * (1 + 1e-9),
            "ilp_vs_best_uniform": None if best is None else i_err / best["total_error"],
            "ilp_solve_seconds": plans[f"ilp@{b}"]["summary"]["solve_seconds"],
        }

    synth = synthetic_problem(1000, 30, seed=0)
    t0 = time.perf_counter()
    res = ilp(synth, ILPConfig())
    synth_seconds = time.perf_counter() - t0
    synthetic = {
        "matrices": 1000,
        "options": 30,
        "budget_bits_per_param": 3.25,
        "seconds": synth_seconds,
        "status": res.status,
        "gap": res.gap,
        "variables_after_pruning": res.info["variables"],
        "nodes": res.info["nodes"],
        "within_budget": synth.cost(res.choice)[1] <= synth.budget_bits,
    }

    results = {
        "model": str(where.path),
        "torch_threads": torch.get_num_threads(),
        "n_matrices": len(table.matrices),
        "n_params": n,
        "n_options": len(table.options),
        "quantizers": sorted({o.quantizer for o in table.options}),
        "error_weighting": table.weighting,
        "calibration": calib,
        "table": {"seconds": table_seconds, "computed": table.computed, "cached": table.cached},
        "skipped": table.skip_reasons(),
        "min_feasible_bits_per_param": low,
        "budgets": grid,
        "curve": curve,
        "uniform": uniform,
        "must_show": checks,
        "plans": plans,
        "synthetic_1000x30": synthetic,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"allocator_minilm{args.tag}"
    _atomic_write(args.out / f"{stem}.json", (json.dumps(results, indent=1) + "\n").encode())
    plot(results, args.out / f"{stem}.png")
    for key, c in checks.items():
        best = c["best_uniform"]
        print(
            f"budget {key}: ilp {c['ilp_error']:.6g} (solve {c['ilp_solve_seconds']:.3f} s), greedy "
            f"{c['greedy_error']:.6g}, best uniform "
            + ("none" if best is None else f"{best['option']} {best['total_error']:.6g} @ {best['bits_per_param']:.4f}")
            + f"; ilp < every uniform: {c['ilp_below_every_uniform']}, ilp <= greedy: {c['ilp_not_worse_than_greedy']}"
        )
    print(
        f"synthetic 1000x30: {synthetic['status']} gap {synthetic['gap']} in {synth_seconds:.2f} s; "
        f"table {table_seconds:.1f} s ({table.computed} quantized, {table.cached} cached); "
        f"weighting {table.weighting}; wrote {args.out}/{stem}.json/.png"
    )
    ok = all(c["ilp_below_every_uniform"] and c["ilp_not_worse_than_greedy"] for c in checks.values())
    return 0 if ok and not math.isnan(synth_seconds) else 1


if __name__ == "__main__":
    sys.exit(main())
