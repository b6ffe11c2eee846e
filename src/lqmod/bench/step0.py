"""Shared machinery of the step-0 benchmarks (``lqmod bench init`` and the like): rows measured
layer by layer on a real model, each row's JSON cached as soon as it is measured.

A :class:`Row` is a base quantizer with its config plus what a mode does over it (an
initializer, ...); its cache key hashes the row, the workload's settings and the schema, so
a changed setting never reuses a stale row. :func:`load_workload` loads the model, the
calibration Hessians (WikiText-2 *validation*, through the statistics cache) and the held-out
data: for an encoder, disjoint halves of test-split sentences give held-out Hessians and the
fidelity sentences (cosine of mean-pooled embeddings to the fp model); for a causal LM, the
first ``ppl_tokens`` tokens of the raw test split give perplexity. Never calibrated on test.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lqmod.bench import fidelity
from lqmod.bench.metrics import cosine_rows, output_rel_error_gram, weight_rel_error
from lqmod.types import LayerStats, QuantizedWeight

__all__ = [
    "Row",
    "Workload",
    "WorkloadSettings",
    "end_fidelity",
    "env_info",
    "layer_metrics",
    "load_workload",
    "quantize_all",
    "run_cached",
    "summarise",
]


@dataclass(frozen=True)
class Row:
    base: str  # a registered quantizer, or "fp" for the unquantized reference
    base_config: dict[str, Any]
    init: str  # what the mode does over the base (an initializer name, ...)
    init_config: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def key(self, settings: dict[str, Any], schema: str) -> str:
        body = json.dumps({"row": asdict(self), "settings": settings, "schema": schema}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class WorkloadSettings:
    model: str
    n_calib: int | None = None  # calibration sentences (encoder, default 256) or windows (causal LM, default 16)
    n_eval: int = 256  # encoder: held-out sentences (x2: statistics + fidelity)
    ctx: int = 256
    ppl_tokens: int = 4096
    rank: int = 16
    alpha: float = 16.0
    cache: Path = Path.home() / ".cache" / "lqmod" / "bench_init"
    progress: bool = True


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


def load_workload(ws: WorkloadSettings) -> Workload:
    from lqmod.bench.calib import wikitext_raw_text
    from lqmod.calibration.command import compute_stats
    from lqmod.calibration.text import calibration_batches
    from lqmod.config import DEFAULT_EXCLUDE, TargetConfig
    from lqmod.data import wikitext_sentences
    from lqmod.hf import load_local_model
    from lqmod.model import find_targets

    torch.manual_seed(0)
    model, tok, where = load_local_model(ws.model)
    model.eval()
    kind = where.kind
    exclude = (*DEFAULT_EXCLUDE, r"(^|\.)pooler\.") if kind != "causal-lm" else DEFAULT_EXCLUDE
    targets = find_targets(model, TargetConfig(exclude=exclude))
    cache = str(Path(ws.cache) / "stats")
    n_calib = ws.n_calib or (16 if kind == "causal-lm" else 256)
    heldout: dict[str, LayerStats] = {}
    eval_data: Any
    if kind == "causal-lm":
        batches = calibration_batches(tok, kind, "wikitext2", n_calib, length=ws.ctx)
        stats = compute_stats(model, targets, batches, {"hessian"}, cache_dir=cache, text="wikitext2 validation",
                              progress=ws.progress)  # fmt: skip
        eval_data = tok(wikitext_raw_text(), return_tensors="pt").input_ids[0][: ws.ppl_tokens + 1]
    else:
        batches = calibration_batches(tok, kind, "wikitext2", n_calib, batch_size=32)
        stats = compute_stats(model, targets, batches, {"hessian"}, cache_dir=cache, text="wikitext2 validation",
                              progress=ws.progress)  # fmt: skip
        sents = list(dict.fromkeys(wikitext_sentences()))[: 2 * ws.n_eval]
        ho_batches = fidelity.encode_batches(tok, sents[: ws.n_eval], batch_size=64)
        heldout = compute_stats(model, targets, ho_batches, {"hessian"}, cache_dir=cache,
                                text="wikitext2 test heldout", progress=ws.progress)  # fmt: skip
        eval_batches = fidelity.encode_batches(tok, sents[ws.n_eval :], batch_size=64)
        with torch.inference_mode():
            eval_data = (eval_batches, fidelity.sentence_embeddings(model, eval_batches))
    # These keys (and their values) are part of every cached row's key.
    settings = {
        "model": where.name, "kind": kind, "n_calib": n_calib, "ctx": ws.ctx,
        "ppl_tokens": ws.ppl_tokens, "n_eval": ws.n_eval, "rank": ws.rank, "alpha": ws.alpha,
        "calib_tokens": max(s.n_tokens for s in stats.values()),
    }  # fmt: skip
    return Workload(where.name, kind, model, targets, stats, heldout, eval_data, settings)


def end_fidelity(w: Workload) -> dict[str, Any]:
    """Perplexity (causal LM) or mean/min cosine to the fp embeddings (encoder) of ``w.model`` as it is."""
    if w.kind == "causal-lm":
        from lqmod.evaluation import stream_perplexity

        res = stream_perplexity(w.model, w.eval_data, context=w.settings["ctx"], batch_size=4)
        return {"metric": "perplexity", "value": res.ppl, "tokens": res.tokens}
    batches, ref = w.eval_data
    with torch.inference_mode():
        cos = cosine_rows(fidelity.sentence_embeddings(w.model, batches), ref)
    return {"metric": "cosine", "value": float(cos.mean()), "min": float(cos.min())}


def dense_weight(w: Workload, name: str) -> torch.Tensor:
    return w.model.get_submodule(name).weight.data.float()


def quantize_all(w: Workload, row: Row, *, progress: bool = True) -> dict[str, QuantizedWeight]:
    """Every target of ``w`` quantized with the row's base (its calibration statistics passed)."""
    from lqmod.plugins import get_registry
    from lqmod.quantize import quantize_weight

    spec = get_registry().quantizer(row.base)
    out = {}
    desc = f"quantize {row.base} {row.base_config.get('bits', '')}"
    for name in tqdm(w.targets, desc=desc, leave=False, disable=not progress):
        out[name] = quantize_weight(spec, dense_weight(w, name), row.base_config, w.stats[name], name=name)
    return out


def layer_metrics(w: Workload, name: str, approx: torch.Tensor) -> dict[str, Any]:
    """Weight error and calibrated (and, for encoders, held-out) output error of ``approx`` for layer ``name``."""
    weight = dense_weight(w, name)
    h = w.stats[name].hessian
    if h is None:
        raise ValueError(f"layer {name}: no calibration Hessian")
    rec = {
        "name": name, "shape": list(weight.shape),
        "w_err": weight_rel_error(weight, approx),
        "out_err": output_rel_error_gram(h, weight, approx),
    }  # fmt: skip
    held = w.heldout[name].hessian if name in w.heldout else None
    if held is not None:
        rec["out_err_heldout"] = output_rel_error_gram(held, weight, approx)
    return rec


def summarise(rec: dict[str, Any]) -> dict[str, Any]:
    """Layer means (errors, entropy), the worst layer's output error, and numel-weighted bits/param."""
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


def _cached(rows: list[Row], cache: Path, settings: dict[str, Any], schema: str) -> Iterator[tuple[Row, Path]]:
    for row in rows:
        yield row, cache / f"{row.key(settings, schema)}.json"


# Measures one row over its base group: (workload, row, the group's shared state) -> the row's record.
RunRow = Callable[[Workload, Row, Any], dict[str, Any]]
# Prepares what a group of rows over one base shares (e.g. the quantized weights), once.
PrepareGroup = Callable[[Workload, Row], Any]


def run_cached(
    rows: list[Row],
    *,
    cache: Path,
    schema: str,
    workload: Callable[[], Workload] | None,
    run_row: RunRow,
    prepare: PrepareGroup | None = None,
    compute: Callable[[Row], bool] = lambda row: True,
    progress: bool = True,
    desc: str = "rows",
) -> dict[str, Any]:
    """Every row from the cache, measuring (then caching) the missing ones that ``compute`` selects.

    ``workload`` is None for a report from the cache alone. Rows sharing a base and config are
    measured together, ``prepare`` run once for them (skipped for the ``fp`` row). Returns
    ``{"schema", "settings", "rows"}``; a row neither cached nor measured is ``status: missing``.
    """
    cache.mkdir(parents=True, exist_ok=True)
    settings_path = cache / "settings.json"
    w: Workload | None = None
    if workload is not None:
        w = workload()
        settings = w.settings
        settings_path.write_text(json.dumps(settings, indent=1, sort_keys=True))
    elif settings_path.is_file():
        settings = json.loads(settings_path.read_text())
    else:
        raise FileNotFoundError(f"--report-only: no cached run in {cache}")
    entries = list(_cached(rows, cache, settings, schema))
    pending = [(r, p) for r, p in entries if not p.is_file() and compute(r)]
    if pending and w is not None:
        groups: dict[str, list[tuple[Row, Path]]] = {}
        for row, path in pending:
            groups.setdefault(json.dumps([row.base, row.base_config], sort_keys=True), []).append((row, path))
        for members in tqdm(list(groups.values()), desc=desc, unit="base", disable=not progress):
            first = members[0][0]
            shared: Any = None
            prep_seconds = None
            if prepare is not None and first.base != "fp":
                t0 = time.perf_counter()
                shared = prepare(w, first)
                prep_seconds = time.perf_counter() - t0
            for row, path in members:
                t0 = time.perf_counter()
                env = env_info()
                if row.base == "fp":
                    rec: dict[str, Any] = {"fidelity": end_fidelity(w), "layers": []}
                else:
                    rec = run_row(w, row, shared)
                    if prep_seconds is not None:
                        rec["quantize_seconds"] = prep_seconds
                rec.update(row=asdict(row), label=row.label, seconds=time.perf_counter() - t0, env=env,
                           load_average_after=list(os.getloadavg()))  # fmt: skip
                path.write_text(json.dumps(rec, indent=1))
                if progress:
                    tqdm.write(f"{row.label}: {json.dumps({**summarise(rec), 'fidelity': rec['fidelity']})}")
    out_rows = []
    for row, path in entries:
        if path.is_file():
            rec = json.loads(path.read_text())
            out_rows.append({**rec, "summary": summarise(rec)})
        else:
            out_rows.append({"label": row.label, "row": asdict(row), "status": "missing"})
    return {"schema": schema, "settings": settings, "rows": out_rows}
