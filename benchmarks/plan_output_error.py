"""Plans from a weight-space vs an output-error table (issue 11, part 2), on real all-MiniLM-L6-v2.

Both tables hold the same options (NF and OPTQ at 2/3/4 bits) quantized with the same
calibration Hessians (WikiText-2 validation sentences); only the error measure differs:
``frobenius`` = ``||W - Q||^2``, ``output`` = ``tr(dW H dW^T) / n``. The ILP allocator picks one
option per matrix within the budget. Each plan (and the uniform options for reference) is then
measured on *held-out* sentences: the summed held-out output error ``sum tr(dW G dW^T) / n``, the
mean relative layer output error, and the end model's mean cosine similarity of sentence
embeddings to the fp32 model's.

    python benchmarks/plan_output_error.py --budget 3.25

Writes benchmarks/results/plan_output_error_minilm.json and .md.

Cost: each table quantizes every option of every matrix (the two measures are cached apart);
on the 2 shared CPU cores of issue 11's session the frobenius table alone took 1589 s, and the
run was stopped before the output table, so no result is committed yet.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lqmod.allocation.planner import allocate_table
from lqmod.allocation.table import build_model_error_table
from lqmod.bench.fidelity import sentence_embeddings, swapped_weights
from lqmod.calibration import collect_hessians
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


def options() -> list[Option]:
    out = [Option("nf", NFConfig(bits=b, blocksize=64, double_quant=True)) for b in (2, 3, 4)]
    out += [Option("optq", OPTQConfig(bits=b, group_size=64, sym=s)) for b in (2, 3, 4) for s in (True, False)]
    return out


def dense_weights(
    model: torch.nn.Module, choice: Mapping[str, Option], stats: Mapping[str, LayerStats]
) -> dict[str, Any]:
    reg = get_registry()
    out = {}
    for name, opt in choice.items():
        spec = reg.quantizer(opt.quantizer)
        w = model.get_submodule(name).weight.detach()
        qw = quantize_weight(spec, w, opt.config, stats[name], name=name)
        out[name] = (spec.materialize(qw, torch.float32), qw.storage_bits())
    return out


def measure(
    model: torch.nn.Module, dense: Mapping[str, Any], held: Mapping[str, LayerStats], eval_batches: Sequence[Any],
    ref_emb: torch.Tensor,
) -> dict[str, float]:
    total, rels, bits, numel = 0.0, [], 0, 0
    for name, (q, b) in dense.items():
        w = model.get_submodule(name).weight.detach().double()
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
    cos = float(torch.nn.functional.cosine_similarity(emb.double(), ref_emb.double(), dim=-1).mean())
    return {
        "bits_per_param": bits / numel,
        "heldout_output_error_sum": total,
        "heldout_rel_output_error_mean": sum(rels) / len(rels),
        "embedding_cosine": cos,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, nargs="+", default=[3.25])
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--n-eval", type=int, default=128)
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/lqmod-plan-cache"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok, where = load_local_model("minilm")
    names = find_targets(model, TargetConfig())
    calib_b = calibration_batches(tok, where.kind, "wikitext2", args.n_calib)
    eval_b = calibration_batches(tok, where.kind, "wikitext2", args.n_eval, offset=args.n_calib)
    with torch.inference_mode():
        calib = collect_hessians(model, names, calib_b, progress=False)
        held = collect_hessians(model, names, eval_b, progress=False)
        ref_emb = sentence_embeddings(model, eval_b)
    opts = options()
    rows: dict[str, Any] = {}
    tables = {}
    for error in ("frobenius", "output"):
        t0 = time.time()
        tables[error] = build_model_error_table(
            model, options=opts, stats=calib, cache=args.cache_dir, progress=False, error=error
        )
        print(f"table {error}: {time.time() - t0:.0f} s", flush=True)
    for opt in opts:
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
            row = measure(model, dense_weights(model, choice, calib), held, eval_b, ref_emb)
            row["mix"] = {
                k: {"matrices": v["matrices"], "params": v["params"]} for k, v in summary["by_option"].items()
            }
            row["by_quantizer"] = {k: v["params"] for k, v in summary["by_quantizer"].items()}
            row["table_total_error"] = summary["total_error"]
            rows[f"plan {budget} bits, {error} table"] = row
            print(f"plan {budget} {error}: {row}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": "all-MiniLM-L6-v2",
        "targets": len(names),
        "calibration": f"{args.n_calib} WikiText-2 validation sentences",
        "held_out": f"the next {args.n_eval} sentences",
        "options": [o.label for o in opts],
        "rows": rows,
    }
    (RESULTS / "plan_output_error_minilm.json").write_text(json.dumps(payload, indent=1))
    lines = [
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
    (RESULTS / "plan_output_error_minilm.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
