"""Orchestration: load a model and real text once, then run every row of the matrix.

For each row and each targeted linear layer: quantize (lqmod plug-in or baseline), measure
bits, weight error and output error on the calibration Gram; then swap all dequantized
weights into the fp32 model and measure end-model fidelity on held-out text. A row that
cannot run is kept with its status and reason. Finally the finetuning benchmark runs (if
asked) and the report is written.
"""

from __future__ import annotations

import platform
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lqmod.bench import calib, fidelity
from lqmod.bench.matrix import RowSpec, default_baselines, default_rows, parse_specs
from lqmod.bench.memory import rss_peak_meter
from lqmod.bench.methods import Unavailable, build_method
from lqmod.bench.metrics import aggregate_layers, bits_per_param, cosine_rows, output_rel_error_gram, weight_rel_error
from lqmod.config import DEFAULT_EXCLUDE, TargetConfig
from lqmod.plugins import get_registry

__all__ = ["SCHEMA", "BenchSettings", "Workload", "finetune_batch", "load_workload", "run_bench", "run_rows"]

SCHEMA = "lqmod.bench/1"


@dataclass
class BenchSettings:
    model: str = "minilm"
    quantizers: str | None = None  # None: the default lqmod rows for the model kind
    baselines: str | None = None  # None: default baselines; "none" or "": no baselines
    out: Path = Path("benchmarks/results")
    n_calib: int | None = None  # sentences (encoder) or windows of `ctx` tokens (causal LM)
    n_eval: int | None = None  # held-out sentences, or windows of `eval_ctx` tokens
    finetune_steps: int = 0
    seed: int = 0
    quick: bool = False
    ctx: int = 256
    eval_ctx: int = 512
    batch_size: int = 16
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self, kind: str) -> BenchSettings:
        enc = kind != "causal-lm"
        defaults = {(True, False): (256, 1000), (True, True): (32, 64), (False, False): (8, 4), (False, True): (2, 1)}
        n_calib, n_eval = defaults[(enc, self.quick)]
        s = BenchSettings(**{**asdict(self), "out": Path(self.out)})
        s.n_calib = self.n_calib or n_calib
        s.n_eval = self.n_eval or n_eval
        if self.quick:
            s.ctx, s.eval_ctx = min(s.ctx, 128), min(s.eval_ctx, 128)
        return s


@dataclass
class Workload:
    """The model, its tokenizer, the text splits and the calibration statistics."""

    name: str
    kind: str  # "encoder" | "causal-lm"
    model: Any
    tokenizer: Any
    targets: list[str]
    splits: calib.SentenceSplits | calib.TokenSplits
    grams: dict[str, torch.Tensor]
    n_tokens: dict[str, int]
    reference: dict[str, Any]
    eval_batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # filled by collect_fisher when a row needs it


def finetune_batch(kind: str, s: BenchSettings) -> int:
    """Sequences per finetuning step: 2 windows for a causal LM (CPU cost), else batch_size."""
    return int(s.extra.get("finetune_batch", 2 if kind == "causal-lm" else s.batch_size))


def _n_train(s: BenchSettings, kind: str) -> int:
    return s.finetune_steps * finetune_batch(kind, s)


def load_workload(s: BenchSettings) -> Workload:
    """Load the model, split the text, capture calibration Grams and the reference fidelity."""
    from lqmod.data import wikitext_sentences
    from lqmod.hf import load_local_model
    from lqmod.model import find_targets

    torch.manual_seed(s.seed)
    model, tokenizer, where = load_local_model(s.model)
    kind = where.kind
    s = s.resolved(kind)
    # Encoders: the pooler is unused by mean-pooled sentence embeddings, so leave it out.
    exclude = (*DEFAULT_EXCLUDE, r"(^|\.)pooler\.") if kind != "causal-lm" else DEFAULT_EXCLUDE
    targets = find_targets(model, TargetConfig(exclude=exclude))
    assert s.n_calib is not None and s.n_eval is not None
    if kind == "causal-lm":
        ids = tokenizer(calib.wikitext_raw_text(), return_tensors="pt").input_ids[0]
        splits: Any = calib.token_splits(
            ids,
            n_calib=s.n_calib,
            n_eval=s.n_eval,
            n_train=_n_train(s, kind),
            ctx=s.ctx,
            eval_ctx=s.eval_ctx,
            seed=s.seed,
        )
        calib_batches = [{"input_ids": w.unsqueeze(0)} for w in splits.calib]
        eval_batches: list[dict[str, torch.Tensor]] = []
    else:
        splits = calib.sentence_splits(wikitext_sentences(), s.n_calib, s.n_eval, _n_train(s, kind), seed=s.seed)
        calib_batches = fidelity.encode_batches(tokenizer, splits.calib, batch_size=32)
        eval_batches = fidelity.encode_batches(tokenizer, splits.eval, batch_size=64)
    grams, n_tokens = calib.capture_grams(model, targets, calib_batches, progress=s.progress)
    t0 = time.perf_counter()
    if kind == "causal-lm":
        reference = {"metric": "perplexity", "value": fidelity.perplexity(model, splits.eval, progress=s.progress)}
    else:
        with torch.inference_mode():
            reference = {
                "metric": "cosine",
                "value": 1.0,
                "embeddings": fidelity.sentence_embeddings(model, eval_batches),
            }
    reference["seconds"] = time.perf_counter() - t0
    return Workload(where.name, kind, model, tokenizer, targets, splits, grams, n_tokens, reference, eval_batches)


def _row_base(row: RowSpec) -> dict[str, Any]:
    return {"label": row.label, "kind": row.kind, "name": row.name, "config": dict(row.config), "notes": []}


def run_row(row: RowSpec, w: Workload, *, progress: bool = True) -> dict[str, Any]:
    """Quantize every target layer with one method, then measure the model with those weights."""
    result = _row_base(row)
    t0 = time.perf_counter()
    try:
        method = build_method(row, get_registry())
    except Unavailable as exc:
        return {**result, "status": "unavailable", "reason": str(exc)}
    except (ValueError, KeyError) as exc:
        return {**result, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    result["source"] = method.source
    layers, weights, notes = [], {}, set()
    name = "(before the first layer)"
    # The peak resident-set growth while quantizing: temporaries such as a GPTQ inverse
    # Hessian or an HQQ optimiser state, on top of the model that is resident anyway.
    try:
        with rss_peak_meter() as peak:
            for name in tqdm(w.targets, desc=row.label[:40], unit="layer", disable=not progress, leave=False):
                weight = w.model.get_submodule(name).weight.data.float()
                q = method.quantize(weight, w.grams.get(name), w.n_tokens.get(name, 0), w.fisher.get(name))
                if q.note:
                    notes.add(q.note)
                layers.append(
                    {
                        "name": name,
                        "shape": list(weight.shape),
                        "numel": weight.numel(),
                        "storage_bits": int(q.storage_bits),
                        "bits_per_param": bits_per_param(q.storage_bits, weight.numel()),
                        "w_err": weight_rel_error(weight, q.weight),
                        "out_err": (
                            output_rel_error_gram(w.grams[name], weight, q.weight) if name in w.grams else None
                        ),
                    }
                )
                weights[name] = q.weight
    except Exception as exc:  # a baseline failing on one layer must not stop the others
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return {**result, "status": "error", "reason": f"at layer {name}: {detail}"}
    result.update(status="ok", notes=sorted(notes), **aggregate_layers(layers))
    result["quantize_seconds"] = time.perf_counter() - t0
    result["quantize_peak_rss_delta_bytes"] = peak.get("delta")
    with fidelity.swapped_weights(w.model, weights):
        result["fidelity"] = _fidelity(w)
    result["seconds"] = time.perf_counter() - t0
    result["layers"] = layers
    return result


def _fidelity(w: Workload) -> dict[str, Any]:
    if w.kind == "causal-lm":
        assert isinstance(w.splits, calib.TokenSplits)
        ppl = fidelity.perplexity(w.model, w.splits.eval)
        return {"metric": "perplexity", "value": ppl, "ratio_to_reference": ppl / float(w.reference["value"])}
    with torch.inference_mode():
        emb = fidelity.sentence_embeddings(w.model, w.eval_batches)
    cos = cosine_rows(emb, w.reference["embeddings"])
    return {"metric": "cosine", "value": float(cos.mean()), "min": float(cos.min())}


def select_rows(s: BenchSettings, kind: str) -> list[RowSpec]:
    registry = get_registry()
    if s.quantizers is None:
        fields = {n: list(spec.config_model.model_fields) for n, spec in registry.quantizers().items()}
        rows = default_rows(kind, fields, quick=s.quick)
    else:
        rows = parse_specs(s.quantizers, "lqmod")
    if s.baselines is None:
        rows += default_baselines(kind, quick=s.quick)
    elif s.baselines.strip().lower() not in ("", "none"):
        rows += parse_specs(s.baselines, "baseline")
    return rows


def rows_need_fisher(rows: list[RowSpec]) -> bool:
    """Whether any lqmod row's quantizer declares ``"fisher"`` in its ``needs``."""
    quantizers = get_registry().quantizers()
    return any(r.kind == "lqmod" and r.name in quantizers and "fisher" in quantizers[r.name].needs for r in rows)


def fisher_batches(w: Workload, *, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """The calibration split as Fisher batches (never the evaluation or training text).

    Causal LM: one window per batch (next-token loss). Encoder: the calibration sentences
    put back in corpus order, so rows (0, 1), (2, 3) ... of a batch are sentences that lie
    close together in one article: the positive pairs of the in-batch contrastive loss.
    """
    if isinstance(w.splits, calib.TokenSplits):
        return [{"input_ids": x.unsqueeze(0)} for x in w.splits.calib]
    from lqmod.data import wikitext_sentences

    position = {sent: i for i, sent in reversed(list(enumerate(s.strip() for s in wikitext_sentences())))}
    ordered = sorted(w.splits.calib, key=lambda sent: position.get(sent, len(position)))
    return fidelity.encode_batches(w.tokenizer, ordered, batch_size=batch_size)


def collect_fisher(w: Workload, *, progress: bool = True) -> None:
    """Fill ``w.fisher`` with the diagonal empirical Fisher of every target (lqmod.calibration)."""
    from lqmod.calibration import diagonal_fisher

    t0 = time.perf_counter()
    w.fisher = diagonal_fisher(w.model, w.targets, fisher_batches(w), progress=progress)
    w.reference["fisher_seconds"] = time.perf_counter() - t0


def run_rows(rows: list[RowSpec], w: Workload, *, progress: bool = True) -> list[dict[str, Any]]:
    results = []
    bar = tqdm(rows, desc=f"bench {w.name}", unit="row", disable=not progress)
    for row in bar:
        bar.set_postfix_str(row.label[:40])
        results.append(run_row(row, w, progress=progress))
    return results


def environment() -> dict[str, str]:
    import importlib.metadata as md

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__}
    for dist in ("lqmod", "transformers", "bitsandbytes", "peft", "hqq", "torchao", "gptqmodel"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            env[dist] = "not installed"
    env["threads"] = str(torch.get_num_threads())
    env["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return env


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Run the whole benchmark for one model; returns the JSON-able results (and writes them)."""
    from lqmod.bench import finetune, report

    t0 = time.perf_counter()
    w = load_workload(settings)
    s = settings.resolved(w.kind)
    rows = select_rows(s, w.kind)
    if rows_need_fisher(rows):
        collect_fisher(w, progress=s.progress)
    results = run_rows(rows, w, progress=s.progress)
    ft = finetune.run_finetune(w, s) if s.finetune_steps > 0 else None
    ref = {k: v for k, v in w.reference.items() if k != "embeddings"}
    data = calib.describe_splits(w.splits, w.kind)
    out = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"name": w.name, "kind": w.kind, "n_target_layers": len(w.targets)},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "data": data,
        "environment": environment(),
        "reference": ref,
        "rows": results,
        "finetune": ft,
        "seconds": time.perf_counter() - t0,
    }
    report.write_report(out, Path(s.out))
    return out
