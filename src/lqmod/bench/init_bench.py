"""Step-0 LoRA initialization over quantized bases (``lqmod bench init``).

For every base (a quantizer and config), every layer is quantized once; then each
initializer starts its adapters over it, and the step-0 weight ``Q + scaling * B A`` (an
initializer that returns its own re-quantized base ``Q'`` is measured over ``Q'``) is
measured per layer: weight error and calibrated output error ``||(W - W0) X^T|| / ||W X^T||``
on the calibration Hessian (and a held-out Hessian for encoders); all step-0 weights are then
swapped into the fp32 model for end fidelity (encoder: cosine of sentence embeddings to the
fp model; causal LM: perplexity). Rows are cached one by one (:mod:`lqmod.bench.step0`).

Rows are data: ``--bases`` and ``--inits`` specs (``[label=]name[:key=value,...]`` joined by
``;``), every base crossed with every initializer, or the default matrix of the model's kind.
An initializer ``a+b`` is a chain: ``b`` starts over the base ``a`` returned (keys ``b.<field>``
configure ``b``, the others ``a``). Rows whose quantizer or initializer is not registered are
dropped from the defaults and refused when given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lqmod.bench import fidelity
from lqmod.bench.matrix import SpecError, parse_value
from lqmod.bench.step0 import (
    Row,
    Workload,
    WorkloadSettings,
    end_fidelity,
    layer_metrics,
    load_workload,
    quantize_all,
    run_cached,
)
from lqmod.config import LoRAConfig
from lqmod.plugins import get_registry
from lqmod.types import QuantizedWeight

__all__ = ["SCHEMA", "InitBenchSettings", "LabelledSpec", "default_matrix", "parse_labelled", "run_init_bench"]

SCHEMA = "lqmod.bench_init/1"


@dataclass(frozen=True)
class LabelledSpec:
    label: str
    name: str
    config: dict[str, Any]


def parse_labelled(text: str, what: str) -> list[LabelledSpec]:
    """``[label=]name[:key=value,...]`` specs joined by ``;``; the label defaults to the name."""
    out = []
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        head, _, rest = part.partition(":")
        label, eq, name = head.partition("=")
        label, name = (label.strip(), name.strip()) if eq else (head.strip(), head.strip())
        if not name or not label or any(c in name + label for c in ", "):
            raise SpecError(f"bad {what} spec {part!r}: expected '[label=]name' or '[label=]name:key=value,...'")
        config: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise SpecError(f"bad item {item!r} in {what} spec {part!r}: expected key=value")
            if key.strip() in config:
                raise SpecError(f"key {key.strip()!r} given twice in {what} spec {part!r}")
            config[key.strip()] = parse_value(value)
        out.append(LabelledSpec(label, name, config))
    if not out:
        raise SpecError(f"no {what} spec in {text!r}")
    return out


# -- the default matrices (data) -----------------------------------------------------------

_NF = "blocksize=64,double_quant=true"
_OPTQ = "group_size=64,sym=false"
# An initializer that re-runs the base quantizer every iteration is capped so the OPTQ rows
# fit the CPU budget; over QuIP (8-50 s per MiniLM layer per run here) it is not run at all.
_FULL_NF = "default;lq-lora:max_iters=10;quailora:method=als;quailora-exact=quailora:method=exact"
_FULL_OPTQ = "default;lq-lora:max_iters=3;quailora:method=als;quailora-exact=quailora:method=exact"
_NO_LQ = "default;quailora:method=als;quailora-exact=quailora:method=exact"
# QuIP at 3/4 bits (added later, rows appended to the cached ones): lq-lora last, at 2 iterations
# (a QuIP run of every layer per iteration); at 2 bits lq-lora was not run.
_QUIP_LQ = _NO_LQ + ";lq-lora:max_iters=2"
# Not an initializer of its own: lq-lora's re-quantized base Q' with the calibrated-optimal
# adapter over it, to show how much of lq-lora's edge on some layers is its base.
_HYBRID = "lq-lora+quailora:max_iters=10,quailora.method=exact"
_MATRIX: dict[str, list[tuple[str, str]]] = {
    "encoder": [
        *[(f"nf{b}=nf:bits={b},{_NF}", _FULL_NF) for b in (2, 3, 4)],
        *[(f"optq{b}=optq:bits={b},{_OPTQ}", _FULL_OPTQ) for b in (2, 3, 4)],
        ("quip2=quip:bits=2", _NO_LQ),
        *[(f"quip{b}=quip:bits={b}", _QUIP_LQ) for b in (3, 4)],
        *[(f"nf{b}=nf:bits={b},{_NF}", _HYBRID) for b in (3, 4)],
    ],
    # SmolLM2 (210 layers, a perplexity run per row) on a 2-core CPU: NF4 in full; NF3, OPTQ-3
    # and QuIP#-like 3/2 with the paper's ALS and the capped lq-lora (as on MiniLM; none over QuIP-2).
    "causal-lm": [
        (f"nf4=nf:bits=4,{_NF}", _FULL_NF),
        (f"nf3=nf:bits=3,{_NF}", "default;quailora:method=als;lq-lora:max_iters=10"),
        (f"optq3=optq:bits=3,{_OPTQ}", "default;quailora:method=als;lq-lora:max_iters=3"),
        ("quip3=quip:bits=3", "default;quailora:method=als;lq-lora:max_iters=2"),
        ("quip2=quip:bits=2", "default;quailora:method=als"),
    ],
}


def _chain(init: str) -> list[str]:
    return init.split("+")


def _rows(pairs: list[tuple[LabelledSpec, LabelledSpec]]) -> list[Row]:
    rows = [Row("fp", {}, "none", label="fp")]
    seen: set[str] = set()
    for base, init in pairs:
        label = f"{base.label} {init.label}"
        if label in seen:
            raise SpecError(f"two rows labelled {label!r}: give them labels, e.g. 'nf4b128=nf:bits=4,blocksize=128'")
        seen.add(label)
        rows.append(Row(base.name, base.config, init.name, init.config, label=label))
    return rows


def default_matrix(kind: str) -> list[Row]:
    """The default rows for a model kind, those whose plug-ins are registered."""
    reg = get_registry()
    quantizers, inits = set(reg.quantizers()), set(reg.initializers())
    pairs = []
    for bases, init_specs in _MATRIX["causal-lm" if kind == "causal-lm" else "encoder"]:
        for base in parse_labelled(bases, "base"):
            for init in parse_labelled(init_specs, "initializer"):
                if base.name in quantizers and all(m in inits for m in _chain(init.name)):
                    pairs.append((base, init))
    return _rows(pairs)


def rows_from_specs(bases: str, inits: str) -> list[Row]:
    """Every base crossed with every initializer, checked against the registry."""
    reg = get_registry()
    quantizers, known = reg.quantizers(), reg.initializers()
    base_specs, init_specs = parse_labelled(bases, "base"), parse_labelled(inits, "initializer")
    for b in base_specs:
        if b.name not in quantizers:
            raise SpecError(f"base {b.name!r} is not a registered quantizer; registered: {sorted(quantizers)}")
    for i in init_specs:
        if len(set(_chain(i.name))) != len(_chain(i.name)):
            raise SpecError(f"initializer chain {i.name!r} names a member twice")
        for m in _chain(i.name):
            if m not in known:
                raise SpecError(f"initializer {m!r} (in {i.name!r}) is not registered; registered: {sorted(known)}")
    return _rows([(b, i) for b in base_specs for i in init_specs])


# -- measuring a row -----------------------------------------------------------------------


def _chain_configs(row: Row) -> list[tuple[str, dict[str, Any]]]:
    members = _chain(row.init)
    own: dict[str, dict[str, Any]] = {m: {} for m in members}
    for key, value in row.init_config.items():
        member, dot, name = key.partition(".")
        if dot and member in members[1:]:
            own[member][name] = value
        else:
            own[members[0]][key] = value
    return [(m, own[m]) for m in members]


def run_init_row(w: Workload, row: Row, qweights: dict[str, QuantizedWeight], *,
                 progress: bool = True) -> dict[str, Any]:  # fmt: skip
    registry = get_registry()
    spec = registry.quantizer(row.base)
    chain = []
    for member, cfg in _chain_configs(row):
        init = registry.initializer(member)
        lora = LoRAConfig(r=w.settings["rank"], alpha=w.settings["alpha"], initializer=member, initializer_config=cfg)
        chain.append((init, init.config_model.model_validate(cfg), lora))
    gen = torch.Generator().manual_seed(0)
    layers, merged = [], {}
    t0 = time.perf_counter()
    lora = chain[0][2]
    for name in tqdm(w.targets, desc=row.label, leave=False, disable=not progress):
        weight, base = w.model.get_submodule(name).weight.data.float(), qweights[name]
        res = None
        for init, member_cfg, member_lora in chain:
            res = init.initialize(weight=weight, qweight=base, materialize=spec.materialize, lora=member_lora,
                                  config=member_cfg, stats=w.stats[name], generator=gen)  # fmt: skip
            base = res.qweight or base
        assert res is not None
        step0 = spec.materialize(base, torch.float32) + lora.scaling * (res.lora_b @ res.lora_a)
        rec = layer_metrics(w, name, step0)
        rec["bits_per_param"] = base.bits_per_param()
        layers.append(rec)
        merged[name] = step0
    init_seconds = time.perf_counter() - t0
    with fidelity.swapped_weights(w.model, merged):
        fid = end_fidelity(w)
    return {"layers": layers, "init_seconds": init_seconds, "fidelity": fid}


# -- the driver ----------------------------------------------------------------------------


@dataclass(frozen=True)
class InitBenchSettings:
    workload: WorkloadSettings
    bases: str | None = None  # with inits: the rows; both None: the default matrix
    inits: str | None = None
    rows: str | None = None  # comma-separated label substrings: compute only matching rows
    report_only: bool = False
    reference: str = "default"  # the initializer label every other is compared against
    versus: tuple[str, ...] = ("lq-lora",)  # further comparisons, where such rows exist
    out: Path = Path("benchmarks/results")


def select_rows(s: InitBenchSettings, kind: str) -> list[Row]:
    if (s.bases is None) != (s.inits is None):
        raise SpecError("give both --bases and --inits (every base crossed with every initializer), or neither")
    if s.bases is not None and s.inits is not None:
        return rows_from_specs(s.bases, s.inits)
    return default_matrix(kind)


def run_init_bench(s: InitBenchSettings) -> dict[str, Any]:
    """Measure (or read from the cache) every row and write ``init_<model>.{json,md,png}``."""
    from lqmod.bench.init_report import write_report
    from lqmod.hf import resolve_model

    where = resolve_model(s.workload.model)
    cache = Path(s.workload.cache) / f"{where.name}-init"
    kind = where.kind
    holder: dict[str, Workload] = {}

    def workload() -> Workload:
        holder["w"] = load_workload(s.workload)
        return holder["w"]

    if kind == "auto" and not s.report_only:
        kind = workload().kind  # a local directory: its config says which kind it is
    rows = select_rows(s, kind)
    wanted = [p.strip() for p in (s.rows or "").split(",") if p.strip()]

    def compute(row: Row) -> bool:
        return not wanted or any(p in row.label for p in wanted)

    def prepare(w: Workload, row: Row) -> dict[str, QuantizedWeight]:
        return quantize_all(w, row, progress=s.workload.progress)

    def run_row(w: Workload, row: Row, qweights: Any) -> dict[str, Any]:
        return run_init_row(w, row, qweights, progress=s.workload.progress)

    def get_workload() -> Workload:
        return holder["w"] if "w" in holder else workload()

    results = run_cached(rows, cache=cache, schema=SCHEMA, workload=None if s.report_only else get_workload,
                         run_row=run_row, prepare=prepare, compute=compute, progress=s.workload.progress,
                         desc=f"{where.name} init rows")  # fmt: skip
    results["part"] = "init"
    results["report"] = {"reference": s.reference, "versus": list(s.versus)}
    write_report(results, Path(s.out), str(results["settings"]["model"]))
    return results
