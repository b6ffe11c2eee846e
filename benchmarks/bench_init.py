"""Step-0 LoRA initialization (default / lq-lora / quailora) and ICQ vs plain NF on real models.

Two parts, each resumable row by row (a row's JSON is cached as soon as it is measured):

* ``--part init``: for every base quantizer (NF, OPTQ, QuIP#-like) and bit width, every layer
  is quantized once, then each initializer starts its adapters; the step-0 weight
  ``Q + scaling * B A`` (lq-lora: its own re-quantized ``Q'``) is measured per layer (weight
  error, calibrated output error ``||(W - W0) X^T|| / ||W X^T||`` on the calibration Hessian,
  and on a held-out Hessian for MiniLM) and swapped into the fp32 model for end fidelity:
  MiniLM sentence-embedding cosine to the fp model, SmolLM2 perplexity.
* ``--part icq``: plain NF-k vs icq over NF-k (same block: +0.127 bits; block 128: exactly the
  bits of plain NF-k at block 64): mean code entropy, weight and output error, fidelity.

Calibration is the WikiText-2 *validation* split (``lqmod.calibration.text``); MiniLM
fidelity uses held-out sentences of the raw test split, SmolLM2 perplexity the first
``--ppl-tokens`` tokens of the raw test split at context ``--ctx``. Never calibrated on test.

    python benchmarks/bench_init.py --model minilm --part init
    python benchmarks/bench_init.py --model smollm2 --part init
    python benchmarks/bench_init.py --model minilm --part icq
    python benchmarks/bench_init.py --model minilm --part init --report-only   # tables from the cache
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import lqmod
from lqmod.bench import fidelity
from lqmod.bench.metrics import cosine_rows, output_rel_error_gram, weight_rel_error
from lqmod.calibration.command import compute_stats
from lqmod.calibration.text import calibration_batches
from lqmod.config import DEFAULT_EXCLUDE, LoRAConfig, TargetConfig
from lqmod.quantize import quantize_weight
from lqmod.types import LayerStats

RESULTS = Path(__file__).resolve().parent / "results"
HYBRID = "lq-lora+quailora"
SCHEMA = "lqmod.bench_init/1"
RANK, ALPHA = 16, 16.0


@dataclass(frozen=True)
class Row:
    base: str  # "fp" for the unquantized reference
    base_config: dict[str, Any]
    init: str  # initializer name, or "icq" / "plain" in the icq part
    init_config: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def key(self, settings: dict[str, Any]) -> str:
        body = json.dumps({"row": asdict(self), "settings": settings, "schema": SCHEMA}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:20]


def base_configs(base: str, bits: int) -> dict[str, Any]:
    if base == "nf":
        return {"bits": bits, "blocksize": 64, "double_quant": True}
    if base == "optq":
        return {"bits": bits, "group_size": 64, "sym": False}
    return {"bits": bits}


# lq-lora re-runs the base quantizer every iteration: capped so the OPTQ rows fit the budget;
# over QuIP (8-50 s per MiniLM layer per run on this CPU) it is not run at all.
LQ_ITERS = {"nf": 10, "optq": 3}


def init_rows(model: str) -> list[Row]:
    rows = [Row("fp", {}, "none", label="fp")]
    # SmolLM2 (210 layers, a perplexity run per row) on the shared 2-core machine: NF4 in full,
    # NF3 default vs quailora only, no OPTQ/QuIP rows. QuIP on MiniLM at 2 bits only, without
    # lq-lora (a QuIP run per lq-lora iteration).
    grids: dict[str, list[tuple[str, tuple[int, ...]]]] = {
        "minilm": [("nf", (2, 3, 4)), ("optq", (2, 3, 4)), ("quip", (2,))],
        "smollm2": [("nf", (4, 3))],
    }
    grid = grids[model]
    for base, widths in grid:
        for bits in widths:
            cfg = base_configs(base, bits)
            tag = f"{base}{bits}"
            full = model == "minilm" or bits == 4
            rows.append(Row(base, cfg, "default", label=f"{tag} default"))
            if base in LQ_ITERS and full:
                rows.append(Row(base, cfg, "lq-lora", {"max_iters": LQ_ITERS[base]}, label=f"{tag} lq-lora"))
            rows.append(Row(base, cfg, "quailora", {"method": "als"}, label=f"{tag} quailora"))
            if full:
                rows.append(Row(base, cfg, "quailora", {"method": "exact"}, label=f"{tag} quailora-exact"))
    if model == "minilm":
        # Not an initializer of its own: lq-lora's re-quantized base Q' with the calibrated-optimal
        # adapter over it, to show how much of lq-lora's edge on some layers is its base.
        rows += [Row("nf", base_configs("nf", b), HYBRID, {"max_iters": LQ_ITERS["nf"]}, label=f"nf{b} {HYBRID}")
                 for b in (3, 4)]  # fmt: skip
    return rows


ICQ_TAU_N = 12  # candidates per side in the benchmark (paper: 51; the sensitivity row checks it)


def icq_rows() -> list[Row]:
    rows = [Row("fp", {}, "none", label="fp")]
    # Block 128 (the equal-bits pairing) at 3 and 4 bits only, and no tau_n=51 row: on the shared
    # 2-core machine an icq row of MiniLM took ~5 min at tau_n=12 (run --rows to add them).
    for bits in (3, 4, 2):
        nf64 = base_configs("nf", bits)
        nf128 = {**nf64, "blocksize": 128}
        rows.append(Row("nf", nf64, "plain", label=f"nf{bits} b64"))
        rows.append(Row("icq", {"base_config": nf64, "tau_n": ICQ_TAU_N}, "plain", label=f"icq-nf{bits} b64"))
        if bits != 2:
            rows.append(Row("nf", nf128, "plain", label=f"nf{bits} b128"))
            rows.append(Row("icq", {"base_config": nf128, "tau_n": ICQ_TAU_N}, "plain", label=f"icq-nf{bits} b128"))
    return rows


# -- the workload ----------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    kind: str
    model: Any
    targets: list[str]
    stats: dict[str, LayerStats]
    heldout: dict[str, LayerStats]
    eval_data: Any
    settings: dict[str, Any]


def load(args: argparse.Namespace) -> Workload:
    from lqmod.data import wikitext_sentences
    from lqmod.hf import load_local_model
    from lqmod.model import find_targets

    torch.manual_seed(0)
    model, tok, where = load_local_model(args.model)
    model.eval()
    kind = where.kind
    exclude = (*DEFAULT_EXCLUDE, r"(^|\.)pooler\.") if kind != "causal-lm" else DEFAULT_EXCLUDE
    targets = find_targets(model, TargetConfig(exclude=exclude))
    cache = str(Path(args.cache) / "stats")
    if kind == "causal-lm":
        batches = calibration_batches(tok, kind, "wikitext2", args.n_calib, length=args.ctx)
        stats = compute_stats(model, targets, batches, {"hessian"}, cache_dir=cache, text="wikitext2 validation")
        ids = tok(fidelity_text(), return_tensors="pt").input_ids[0][: args.ppl_tokens + 1]
        heldout: dict[str, LayerStats] = {}
        eval_data: Any = ids
    else:
        batches = calibration_batches(tok, kind, "wikitext2", args.n_calib, batch_size=32)
        stats = compute_stats(model, targets, batches, {"hessian"}, cache_dir=cache, text="wikitext2 validation")
        sents = list(dict.fromkeys(wikitext_sentences()))[: 2 * args.n_eval]
        # Held-out statistics and fidelity sentences: disjoint halves of test-split sentences.
        ho_batches = fidelity.encode_batches(tok, sents[: args.n_eval], batch_size=64)
        heldout = compute_stats(model, targets, ho_batches, {"hessian"}, cache_dir=cache, text="wikitext2 test heldout")
        eval_batches = fidelity.encode_batches(tok, sents[args.n_eval :], batch_size=64)
        with torch.inference_mode():
            eval_data = (eval_batches, fidelity.sentence_embeddings(model, eval_batches))
    settings = {
        "model": where.name, "kind": kind, "n_calib": args.n_calib, "ctx": args.ctx,
        "ppl_tokens": args.ppl_tokens, "n_eval": args.n_eval, "rank": RANK, "alpha": ALPHA,
        "calib_tokens": max(s.n_tokens for s in stats.values()),
    }  # fmt: skip
    return Workload(where.name, kind, model, targets, stats, heldout, eval_data, settings)


def fidelity_text() -> str:
    from lqmod.bench.calib import wikitext_raw_text

    return wikitext_raw_text()


def end_fidelity(w: Workload) -> dict[str, Any]:
    if w.kind == "causal-lm":
        from lqmod.evaluation import stream_perplexity

        res = stream_perplexity(w.model, w.eval_data, context=w.settings["ctx"], batch_size=4)
        return {"metric": "perplexity", "value": res.ppl, "tokens": res.tokens}
    batches, ref = w.eval_data
    with torch.inference_mode():
        cos = cosine_rows(fidelity.sentence_embeddings(w.model, batches), ref)
    return {"metric": "cosine", "value": float(cos.mean()), "min": float(cos.min())}


# -- measuring rows --------------------------------------------------------------------------


def _weight(w: Workload, name: str) -> torch.Tensor:
    return w.model.get_submodule(name).weight.data.float()


def quantize_all(w: Workload, row: Row) -> dict[str, Any]:
    registry = lqmod.get_registry()
    spec = registry.quantizer(row.base)
    out = {}
    for name in tqdm(w.targets, desc=f"quantize {row.base} {row.base_config.get('bits', '')}", leave=False):
        out[name] = quantize_weight(spec, _weight(w, name), row.base_config, w.stats[name], name=name)
    return out


def layer_metrics(w: Workload, name: str, approx: torch.Tensor) -> dict[str, Any]:
    weight = _weight(w, name)
    h = w.stats[name].hessian
    assert h is not None
    rec = {
        "name": name, "shape": list(weight.shape),
        "w_err": weight_rel_error(weight, approx),
        "out_err": output_rel_error_gram(h, weight, approx),
    }  # fmt: skip
    held = w.heldout[name].hessian if name in w.heldout else None
    if held is not None:
        rec["out_err_heldout"] = output_rel_error_gram(held, weight, approx)
    return rec


def run_init_row(w: Workload, row: Row, qweights: dict[str, Any]) -> dict[str, Any]:
    registry = lqmod.get_registry()
    spec = registry.quantizer(row.base)
    hybrid = row.init == HYBRID
    init = registry.initializer("lq-lora" if hybrid else row.init)
    lora = LoRAConfig(r=RANK, alpha=ALPHA, initializer=init.name, initializer_config=row.init_config)
    cfg = init.config_model.model_validate(row.init_config)
    quai = registry.initializer("quailora")
    quai_cfg = quai.config_model.model_validate({"method": "exact"})
    gen = torch.Generator().manual_seed(0)
    layers, merged = [], {}
    t0 = time.perf_counter()
    for name in tqdm(w.targets, desc=row.label, leave=False):
        weight, qw = _weight(w, name), qweights[name]
        res = init.initialize(weight=weight, qweight=qw, materialize=spec.materialize, lora=lora, config=cfg,
                              stats=w.stats[name], generator=gen)  # fmt: skip
        base = res.qweight or qw
        if hybrid:
            res = quai.initialize(weight=weight, qweight=base, materialize=spec.materialize, lora=lora,
                                  config=quai_cfg, stats=w.stats[name], generator=gen)  # fmt: skip
        step0 = spec.materialize(base, torch.float32) + lora.scaling * (res.lora_b @ res.lora_a)
        rec = layer_metrics(w, name, step0)
        rec["bits_per_param"] = base.bits_per_param()
        layers.append(rec)
        merged[name] = step0
    init_seconds = time.perf_counter() - t0
    with fidelity.swapped_weights(w.model, merged):
        fid = end_fidelity(w)
    return {"layers": layers, "init_seconds": init_seconds, "fidelity": fid}


def run_icq_row(w: Workload, row: Row) -> dict[str, Any]:
    from lqmod_icq import base_qweight, block_codes, block_entropy

    registry = lqmod.get_registry()
    spec = registry.quantizer(row.base)
    nf = registry.quantizer("nf")
    layers, merged = [], {}
    t0 = time.perf_counter()
    violations = shifted = blocks = 0
    for name in tqdm(w.targets, desc=row.label, leave=False):
        weight = _weight(w, name)
        qw = quantize_weight(spec, weight, row.base_config, name=name)
        dense = spec.materialize(qw, torch.float32)
        if row.base == "icq":
            inner = base_qweight(qw)
            plain = quantize_weight(nf, weight, row.base_config["base_config"], name=name)
            codes, bits = block_codes(nf, inner)
            plain_codes, _ = block_codes(nf, plain)
            h, h0 = block_entropy(codes, bits), block_entropy(plain_codes, bits)
            moved = qw.tensors["tau_codes"] != 0
            # The claims, over every block of the model: entropy strictly up where shifted,
            # the plain codes exactly where not.
            violations += int((h[moved] <= h0[moved]).sum())
            violations += int((codes[~moved] != plain_codes[~moved]).any(dim=1).sum())
            shifted += int(moved.sum())
        else:
            codes, bits = block_codes(nf, qw)
            h = block_entropy(codes, bits)
        blocks += int(h.numel())
        rec = layer_metrics(w, name, dense)
        rec.update(bits_per_param=qw.bits_per_param(), entropy=float(h.mean()), max_entropy=float(bits))
        layers.append(rec)
        merged[name] = dense
    seconds = time.perf_counter() - t0
    with fidelity.swapped_weights(w.model, merged):
        fid = end_fidelity(w)
    extra = {"shifted_blocks": shifted, "entropy_violations": violations} if row.base == "icq" else {}
    return {"layers": layers, "quantize_seconds": seconds, "fidelity": fid, "blocks": blocks, **extra}


def summarise(rec: dict[str, Any]) -> dict[str, Any]:
    layers = rec.get("layers", [])
    if not layers:
        return {}
    n = len(layers)
    numel = [math.prod(r["shape"]) for r in layers]
    out = {
        "n_layers": n,
        "w_err": sum(r["w_err"] for r in layers) / n,
        "out_err": sum(r["out_err"] for r in layers) / n,
        "out_err_max": max(r["out_err"] for r in layers),
        "bits_per_param": sum(r["bits_per_param"] * k for r, k in zip(layers, numel, strict=True)) / sum(numel),
    }
    if "out_err_heldout" in layers[0]:
        out["out_err_heldout"] = sum(r["out_err_heldout"] for r in layers) / n
    if "entropy" in layers[0]:
        out["entropy"] = sum(r["entropy"] * k for r, k in zip(layers, numel, strict=True)) / sum(numel)
    return out


# -- the driver ------------------------------------------------------------------------------


def env_info() -> dict[str, Any]:
    return {
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def cached_rows(rows: list[Row], cache: Path, settings: dict[str, Any]) -> Iterator[tuple[Row, Path, Any]]:
    for row in rows:
        path = cache / f"{row.key(settings)}.json"
        yield row, path, (json.loads(path.read_text()) if path.is_file() else None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = init_rows(args.model) if args.part == "init" else icq_rows()
    if args.rows:
        rows = [r for r in rows if any(p in r.label for p in args.rows.split(","))]
    cache = Path(args.cache) / f"{args.model}-{args.part}"
    cache.mkdir(parents=True, exist_ok=True)
    w: Workload | None = None
    settings_path = cache / "settings.json"
    results = []
    pending = []
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else None
    if not args.report_only:
        w = load(args)
        settings = w.settings
        settings_path.write_text(json.dumps(settings, indent=1, sort_keys=True))
    if settings is None:
        raise SystemExit(f"--report-only: no cached run in {cache}")
    for row, path, rec in cached_rows(rows, cache, settings):
        if rec is None:
            pending.append((row, path))
        results.append((row, path))
    if pending and not args.report_only:
        assert w is not None
        groups: dict[str, list[tuple[Row, Path]]] = {}
        for row, path in pending:
            groups.setdefault(json.dumps([row.base, row.base_config], sort_keys=True), []).append((row, path))
        for members in tqdm(list(groups.values()), desc=f"{args.model} {args.part} rows", unit="base"):
            first = members[0][0]
            qweights = None
            if args.part == "init" and first.base != "fp":
                t0 = time.perf_counter()
                qweights = quantize_all(w, first)
                q_seconds = time.perf_counter() - t0
            for row, path in members:
                t0 = time.perf_counter()
                env = env_info()
                if row.base == "fp":
                    rec = {"fidelity": end_fidelity(w), "layers": []}
                elif args.part == "init":
                    assert qweights is not None
                    rec = {**run_init_row(w, row, qweights), "quantize_seconds": q_seconds}
                else:
                    rec = run_icq_row(w, row)
                rec.update(row=asdict(row), label=row.label, seconds=time.perf_counter() - t0, env=env,
                           load_average_after=list(os.getloadavg()))  # fmt: skip
                path.write_text(json.dumps(rec, indent=1))
                print(f"{row.label}: {json.dumps({**summarise(rec), 'fidelity': rec['fidelity']})}", flush=True)
    out_rows = []
    for row, path in results:
        if path.is_file():
            rec = json.loads(path.read_text())
            out_rows.append({**rec, "summary": summarise(rec)})
        else:
            out_rows.append({"label": row.label, "row": asdict(row), "status": "missing"})
    return {"schema": SCHEMA, "part": args.part, "settings": settings, "rows": out_rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    p.add_argument("--part", choices=["init", "icq"], default="init")
    p.add_argument("--rows", help="comma-separated label substrings: run only matching rows")
    p.add_argument("--n-calib", type=int, default=None, help="calibration sentences (MiniLM) or windows (SmolLM2)")
    p.add_argument("--n-eval", type=int, default=256, help="MiniLM: held-out sentences (x2: statistics + fidelity)")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lqmod" / "bench_init"))
    p.add_argument("--report-only", action="store_true", help="write the report from cached rows, compute nothing")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.n_calib is None:
        args.n_calib = 256 if args.model == "minilm" else 16
    from bench_init_report import write_report  # the tables and plots live beside this script

    results = run(args)
    write_report(results, Path(args.out), args.model, args.part)


if __name__ == "__main__":
    main()
