"""Why ICQ measures worse than plain NF: per-block and per-layer diagnostics on a real model.

For every quantized layer and each NF width it builds, over the same blocks:

* ``nf``: plain NF-k;
* ``icq``: the ``icq`` plug-in (shift rounded to its stored 8-bit value before the search);
* ``icq-ref``: the IR-QLoRA reference code's procedure re-implemented here: candidates
  ``median + f * spread`` only (no ``tau = 0``), the exact ``tau`` quantized and the
  dynamic-map 8-bit ``tau`` (absmax per 256 blocks) added back, ties to the first candidate;
* ``icq-guard`` (diagnostic): the icq search, but a block keeps a shift only where it also
  does not raise the block's squared error;
* ``mse-shift`` (diagnostic): the shift on the same grid that minimises each block's squared
  error (what a shift *could* buy in error; not entropy-driven).

It reports mean code entropy, weight / calibrated output error, the share of blocks whose
squared error rises against plain NF (binned by the block's outlier ratio
``max|w - median| / std(w)``), end fidelity with all layers swapped, and an attribution:
icq in one layer family only, plain NF elsewhere.

The committed results (``benchmarks/results/icq_study_minilm_*.json``), run from ``benchmarks/``:

    # fidelity (64 held-out sentences), attribution, error change by outlier ratio: NF3 b64
    OMP_NUM_THREADS=1 python icq_study.py --bits 3 --cache /work/cache_icq --out results/icq_study_minilm_fidelity.json
    # per-layer errors incl. the error on the mean input, NF3 and NF4, no model passes
    OMP_NUM_THREADS=1 python icq_study.py --bits 3 4 --no-fidelity --cache /work/cache_icq \
        --out results/icq_study_minilm_errors.json
    # where the error goes in the outlier-heavy FFN-down layer 0
    OMP_NUM_THREADS=1 python icq_study.py --block-report encoder.layer.0.output.dense --bits 4 3 \
        --out results/icq_study_minilm_blocks.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import lqmod
from lqmod.bench import fidelity
from lqmod.bench.metrics import output_rel_error_gram, weight_rel_error
from lqmod.quantize import quantize_weight
from lqmod_icq import block_codes, block_entropy
from lqmod_icq.search import _candidate_factors
from lqmod_nf.codebooks import dynamic_map, nearest_code, nf_table

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("nf", "icq", "icq-ref", "icq-guard", "mse-shift")
DEFAULT_VARIANTS = ("nf", "icq", "icq-ref", "icq-guard")
RATIO_BINS = (0.0, 3.0, 4.0, 6.0, math.inf)


def nf_codes_err(blocks: torch.Tensor, tau: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of ``blocks - tau`` under NF absmax scaling (exact absmax) and each block's squared error."""
    shifted = blocks - tau.unsqueeze(1)
    absmax = shifted.abs().amax(dim=1).clamp(min=1e-38)
    codes = nearest_code(torch.clamp(shifted * (1.0 / absmax).unsqueeze(1), -1, 1), table)
    err = ((table[codes] * absmax.unsqueeze(1) - shifted).double() ** 2).sum(dim=1)
    return codes, err


def search(
    blocks: torch.Tensor, bits: int, factors: list[float], *, with_zero: bool, guard: bool, objective: str
) -> torch.Tensor:
    """The per-block shift (float32, exact) maximising entropy (or minimising error) over the grid."""
    table = nf_table(bits)
    median = blocks.median(dim=1).values
    spread = (blocks - median.unsqueeze(1)).abs().amax(dim=1)
    zero = torch.zeros_like(median)
    codes0, err0 = nf_codes_err(blocks, zero, table)
    best_tau = zero.clone()
    best_h = block_entropy(codes0, bits) if with_zero else torch.full_like(median, -1.0, dtype=torch.float64)
    best_e = err0.clone() if with_zero else torch.full_like(err0, math.inf)
    for f in factors:
        tau = median + f * spread
        codes, err = nf_codes_err(blocks, tau, table)
        if objective == "mse":
            better = err < best_e
        else:
            h = block_entropy(codes, bits)
            better = h > best_h
            if guard:
                better &= err <= err0
            best_h = torch.where(better, h, best_h)
        best_e = torch.where(better, err, best_e)
        best_tau = torch.where(better, tau, best_tau)
    return best_tau


def dynamic_tau(tau: torch.Tensor, groupsize: int = 256) -> torch.Tensor:
    """The reference's stored shift: dynamic-map 8-bit code of tau / absmax over 256 blocks."""
    n = tau.numel()
    pad = (-n) % groupsize
    t = torch.cat([tau, tau.new_zeros(pad)]).view(-1, groupsize)
    absmax = t.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
    dmap = dynamic_map()
    q = dmap[nearest_code(t / absmax, dmap)] * absmax
    return q.reshape(-1)[:n]


def build(weight: torch.Tensor, variant: str, bits: int, blocksize: int, tau_n: int) -> tuple[torch.Tensor, Any]:
    """(materialized float32 weight, base codes) of one variant."""
    reg = lqmod.get_registry()
    nf = reg.quantizer("nf")
    cfg = {"bits": bits, "blocksize": blocksize, "double_quant": True}
    blocks = weight.float().reshape(-1, blocksize)
    if variant == "icq":
        qw = quantize_weight(reg.quantizer("icq"), weight, {"base_config": cfg, "tau_n": tau_n})
        from lqmod_icq import base_qweight

        return reg.quantizer("icq").materialize(qw, torch.float32), block_codes(nf, base_qweight(qw))[0]
    if variant == "nf":
        tau_exact = torch.zeros(blocks.shape[0])
        tau_added = tau_exact
    else:
        factors = _candidate_factors(0.1, tau_n)
        if variant == "icq-ref":
            # The reference's order: linspace from -0.1 sigma to +0.1 sigma, strict '>' keeps the first.
            factors = sorted(factors)
            tau_exact = search(blocks, bits, factors, with_zero=False, guard=False, objective="entropy")
            tau_added = dynamic_tau(tau_exact)
        else:
            tau_exact = search(
                blocks, bits, factors, with_zero=True, guard=variant == "icq-guard",
                objective="mse" if variant == "mse-shift" else "entropy",
            )  # fmt: skip
            tau_added = tau_exact  # diagnostics: the exact shift (float32) is added back
    shifted = (blocks - tau_exact.unsqueeze(1)).view_as(weight)
    qw = quantize_weight(nf, shifted, cfg)
    dense = (nf.materialize(qw, torch.float32).reshape(-1, blocksize) + tau_added.unsqueeze(1)).view_as(weight)
    return dense, block_codes(nf, qw)[0]


def block_outlier_ratio(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    b = weight.double().reshape(-1, blocksize)
    med = b.median(dim=1).values
    return (b - med.unsqueeze(1)).abs().amax(dim=1) / b.std(dim=1).clamp(min=1e-300)


def mean_inputs(model: torch.nn.Module, names: list[str], batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Mean input row of every named linear layer over the real (unpadded) tokens of ``batches``."""
    sums: dict[str, torch.Tensor] = {}
    count = {"n": 0}
    mask: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def f(_m: torch.nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            x = inp[0].double()
            keep = mask["m"].reshape(-1).bool()
            sums[name] = sums.get(name, 0) + x.reshape(-1, x.shape[-1])[keep].sum(dim=0)

        return f

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for b in batches:
                mask["m"] = b["attention_mask"] if "attention_mask" in b else torch.ones_like(b["input_ids"])
                count["n"] += int(mask["m"].sum())
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return {n: v / count["n"] for n, v in sums.items()}


def family(name: str) -> str:
    """The layer's role without its block index: ``encoder.layer.3.output.dense`` -> ``output.dense``."""
    return re.sub(r"^.*?\.\d+\.", "", name)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lqmod.bench import step0

    w = step0.load_workload(step0.WorkloadSettings(model=args.model, n_calib=args.n_calib, n_eval=args.n_eval,
                                                   ctx=args.ctx, ppl_tokens=args.ppl_tokens, cache=Path(args.cache)))
    variants = ("nf", *[v for v in args.variants if v != "nf"])  # nf first: the others are compared with it
    if w.kind != "causal-lm" and args.eval_batches:
        # A subset of the fidelity sentences (batches of 64): the study compares variants with
        # each other, and each swap costs a model pass on a heavily shared machine.
        batches, ref = w.eval_data
        n = sum(int(b["input_ids"].shape[0]) for b in batches[: args.eval_batches])
        w.eval_data = (batches[: args.eval_batches], ref[:n])
    out: dict[str, Any] = {"settings": {**w.settings, "tau_n": args.tau_n, "blocksizes": args.blocksizes,
                                        "variants": list(variants), "eval_batches": args.eval_batches},
                           "env": step0.env_info(), "widths": {}}  # fmt: skip
    mu: dict[str, Any] = {}
    if w.kind != "causal-lm":
        # Mean pooling keeps what is common to a sentence's tokens: the error on the mean input
        # ||(W_q - W) mu|| / ||W mu|| is what the embedding cosine sees first.
        mu = mean_inputs(w.model, w.targets, w.eval_data[0])
    if args.layers:
        w.targets = [n for n in w.targets if re.search(args.layers, n)]
    for bits in args.bits:
        for bs in args.blocksizes:
            key = f"nf{bits} b{bs}"
            t0 = time.perf_counter()
            dense: dict[str, dict[str, torch.Tensor]] = {v: {} for v in variants}
            layers = []
            bins = {v: [[0, 0, 0.0] for _ in RATIO_BINS[:-1]] for v in variants[1:]}  # n, n_up, sum d(err)/err
            for name in tqdm(w.targets, desc=key, leave=False):
                weight = step0.dense_weight(w, name)
                h = w.stats[name].hessian
                assert h is not None
                ratio = block_outlier_ratio(weight, bs)
                which = torch.bucketize(ratio, torch.tensor(RATIO_BINS[1:-1], dtype=torch.float64), right=True)
                rec: dict[str, Any] = {"name": name, "shape": list(weight.shape)}
                base_err = None
                for v in variants:
                    d, codes = build(weight, v, bits, bs, args.tau_n)
                    dense[v][name] = d
                    blk_err = ((d.double() - weight.double()).reshape(-1, bs) ** 2).sum(dim=1)
                    err = d.double() - weight.double()
                    rec[v] = {
                        "entropy": float(block_entropy(codes, bits).mean()),
                        "w_err": weight_rel_error(weight, d),
                        "out_err": output_rel_error_gram(h, weight, d),
                        # The error's per-block mean (its DC part) against the weight's RMS.
                        "block_dc_rel": float(err.reshape(-1, bs).mean(dim=1).pow(2).mean().sqrt()
                                              / weight.double().pow(2).mean().sqrt()),
                    }  # fmt: skip
                    if name in mu:
                        m = mu[name]
                        rec[v]["mean_input_err"] = float((err @ m).norm() / (weight.double() @ m).norm())
                    if v == "nf":
                        base_err = blk_err
                        continue
                    assert base_err is not None
                    up = blk_err > base_err * (1 + 1e-6)
                    rec[v]["blocks_err_up"] = float(up.double().mean())
                    rel = (blk_err - base_err) / base_err.clamp(min=1e-300)
                    for i in range(len(RATIO_BINS) - 1):
                        m = which == i
                        bins[v][i][0] += int(m.sum())
                        bins[v][i][1] += int((up & m).sum())
                        bins[v][i][2] += float(rel[m].sum())
                layers.append(rec)
            summary: dict[str, Any] = {}
            for v in variants:
                metrics = ["entropy", "w_err", "out_err", "block_dc_rel"] + (["mean_input_err"] if mu else [])
                summary[v] = {m: sum(r[v][m] for r in layers) / len(layers) for m in metrics}
                if not args.no_fidelity:
                    with fidelity.swapped_weights(w.model, dense[v]):
                        summary[v]["fidelity"] = step0.end_fidelity(w)["value"]
            # Attribution: icq only in the named layer family (plain NF elsewhere), and the reverse.
            attribution = {}
            for fam in [] if args.no_fidelity else args.attribute:
                for inside in (True, False):
                    mixed = {n: dense["icq" if (family(n) == fam) == inside else "nf"][n] for n in w.targets}
                    with fidelity.swapped_weights(w.model, mixed):
                        attribution[("icq only in " if inside else "icq except in ") + fam] = (
                            step0.end_fidelity(w)["value"]
                        )
            by_ratio = {
                v: [
                    {"ratio": [RATIO_BINS[i], RATIO_BINS[i + 1]], "blocks": b[0],
                     "share_err_up": b[1] / max(b[0], 1), "mean_rel_err_change": b[2] / max(b[0], 1)}
                    for i, b in enumerate(bins[v])
                ]
                for v in variants[1:]
            }  # fmt: skip
            out["widths"][key] = {"summary": summary, "icq_only_in": attribution, "by_ratio": by_ratio,
                                  "layers": layers, "seconds": time.perf_counter() - t0,
                                  "load_average": list(os.getloadavg())}  # fmt: skip
            print(key, json.dumps({"summary": summary, "icq_only_in": attribution}), flush=True)
    return out


def block_report(layer: str, bits: int, tau_n: int, top: int = 5) -> dict[str, Any]:
    """One MiniLM layer from its safetensors: where icq's error goes (outlier blocks) and the worst blocks."""
    from safetensors import safe_open

    from lqmod.hf import resolve_model
    from lqmod_icq import shifts

    with safe_open(str(resolve_model("minilm").path / "model.safetensors"), "pt") as f:
        weight = f.get_tensor(f"{layer}.weight").float()
    reg = lqmod.get_registry()
    cfg = {"bits": bits, "blocksize": 64, "double_quant": True}
    nf, icq = reg.quantizer("nf"), reg.quantizer("icq")
    q0 = nf.materialize(quantize_weight(nf, weight, cfg), torch.float64).reshape(-1, 64)
    qi = quantize_weight(icq, weight, {"base_config": cfg, "tau_n": tau_n})
    q1 = icq.materialize(qi, torch.float64).reshape(-1, 64)
    tau = shifts(qi).double()
    w = weight.double().reshape(-1, 64)
    e0, e1 = (q0 - w).pow(2).sum(dim=1), (q1 - w).pow(2).sum(dim=1)
    ratio = block_outlier_ratio(weight, 64)
    out: dict[str, Any] = {"layer": layer, "bits": bits, "tau_n": tau_n,
                           "w_err": [float(e0.sum().sqrt() / w.norm()), float(e1.sum().sqrt() / w.norm())]}  # fmt: skip
    for cut in (6.0,):
        m = ratio > cut
        share = [float(e0[m].sum() / e0.sum()), float(e1[m].sum() / e1.sum())]
        out[f"blocks_ratio_gt_{cut:g}"] = {"n": int(m.sum()), "n_blocks": int(m.numel()), "share_of_sq_err": share}
    worst = torch.argsort(e1 - e0, descending=True)[:top]
    rest = lambda i: torch.cat([w[i][: int(w[i].abs().argmax())], w[i][int(w[i].abs().argmax()) + 1 :]])  # noqa: E731
    out["worst_blocks"] = [
        {"block": int(i), "absmax": float(w[i].abs().max()), "std_without_max": float(rest(i).std()),
         "median": float(w[i].median()), "tau": float(tau[i]), "err_nf": float(e0[i].sqrt()),
         "err_icq": float(e1[i].sqrt())}
        for i in worst.tolist()
    ]  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--blocksizes", type=int, nargs="+", default=[64])
    p.add_argument("--tau-n", type=int, default=12)
    p.add_argument("--layers", default=None, help="regex: only matching layers (with --no-fidelity)")
    p.add_argument("--no-fidelity", action="store_true", help="per-layer metrics only: no model passes")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    p.add_argument("--attribute", nargs="*", default=["output.dense"], help="layer families for the attribution")
    p.add_argument("--eval-batches", type=int, default=1, help="encoder: fidelity batches of 64 sentences (0: all)")
    p.add_argument("--n-calib", type=int, default=None)
    p.add_argument("--n-eval", type=int, default=256)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lqmod" / "icq_study"))
    p.add_argument("--out", default=str(RESULTS / "icq_study_minilm.json"))
    p.add_argument("--block-report", default=None, help="only the per-block report of this MiniLM layer")
    args = p.parse_args()
    if args.block_report:
        rep = [block_report(args.block_report, b, args.tau_n) for b in args.bits]
        Path(args.out).write_text(json.dumps(rep, indent=1))
        print(json.dumps(rep, indent=1))
        return
    if args.n_calib is None:
        args.n_calib = 256 if args.model == "minilm" else 16
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    res = run(args)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
