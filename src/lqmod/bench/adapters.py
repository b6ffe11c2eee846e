"""Adapter variants after the same finetuning budget over shared quantized bases (``lqmod bench adapters``).

Each base (a quantizer spec, e.g. ``nf:bits=3,blocksize=64``) quantizes the model once, with
plain LoRA adapters from the ``default`` initializer's settings of :func:`lqmod.model.quantize_model`.
Every variant then starts from a copy of that model, its adapters converted in place
(:func:`lqmod.model.convert_adapters`: the same ``A`` and ``B`` over the same frozen base, so at
their default settings all variants compute the same step-0 function; checked on one probe
batch) and trains for the same steps on the same batches (seed, lr, rank alike). Variants are
registry names: by default every registered adapter variant.

Objectives, by model kind:

* encoder (MiniLM): distil the fp32 sentence embeddings, ``1 - cos`` on WikiText-2 training
  sentences (the :mod:`lqmod.bench.finetune` objective); metric: mean cosine to fp32 on held-out
  sentences;
* causal LM (SmolLM2): next-token loss on packed WikiText-2 validation windows
  (:func:`lqmod.train.train_causal_lm`); metric: perplexity on the first tokens of WikiText-2 raw test.
"""

from __future__ import annotations

import copy
import os
import platform
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lqmod.bench.matrix import RowSpec, SpecError, format_spec, parse_specs
from lqmod.bench.memory import rss_peak_meter
from lqmod.plugins import get_registry
from lqmod.types import LayerStats

__all__ = ["SCHEMA", "AdapterBenchSettings", "default_bases", "run_adapter_bench", "select_variants"]

SCHEMA = "lqmod.bench_adapters/1"

# Default bases per model kind, as data (rows whose quantizer is not registered are dropped).
_DEFAULT_BASES = {
    "causal-lm": ("nf:bits=3,blocksize=64,double_quant=true",),
    "encoder": (
        "nf:bits=4,blocksize=64,double_quant=true",
        "nf:bits=3,blocksize=64,double_quant=true",
        "optq:bits=3,group_size=64",
    ),
}
# (steps, sequences per step, lr) per model kind: a causal-LM step costs ~10x an encoder step on CPU.
_DEFAULT_BUDGET = {"causal-lm": (8, 4, 1e-3), "encoder": (40, 16, 1e-3)}


@dataclass
class AdapterBenchSettings:
    model: str = "minilm"
    bases: str | None = None  # quantizer specs joined by ';' (None: the defaults for the model kind)
    adapters: str | None = None  # variant names joined by ',' (None: every registered variant)
    steps: int | None = None
    batch: int | None = None  # sequences per step
    lr: float | None = None
    rank: int = 8
    seed: int = 0
    n_calib: int | None = None  # calibration sentences (encoder, 256) / windows (causal LM, 16), if a base needs them
    n_eval: int | None = None  # encoder: held-out sentences
    seq_len: int = 128  # causal LM: tokens per training window
    eval_tokens: int = 4096  # causal LM: perplexity tokens
    eval_context: int = 256
    layer_timing: bool = True
    out: Path = Path("benchmarks/results")
    name: str | None = None  # output stem (default: adapters_<model>)
    progress: bool = True

    def resolved(self, kind: str) -> AdapterBenchSettings:
        steps, batch, lr = _DEFAULT_BUDGET["causal-lm" if kind == "causal-lm" else "encoder"]
        return replace(
            self,
            steps=steps if self.steps is None else self.steps,
            batch=self.batch or batch,
            lr=lr if self.lr is None else self.lr,
            n_calib=self.n_calib or (16 if kind == "causal-lm" else 256),
            n_eval=self.n_eval or 1000,
        )


def default_bases(kind: str, registered: set[str]) -> list[RowSpec]:
    specs = _DEFAULT_BASES["causal-lm" if kind == "causal-lm" else "encoder"]
    return [r for r in parse_specs(";".join(specs), "lqmod") if r.name in registered]


def select_bases(text: str | None, kind: str) -> list[RowSpec]:
    """The base rows: parsed and checked against the registry (a one-line error naming the known ones)."""
    quantizers = get_registry().quantizers()
    rows = default_bases(kind, set(quantizers)) if text is None else parse_specs(text, "lqmod")
    for r in rows:
        if r.name not in quantizers:
            raise SpecError(f"base {r.name!r} is not a registered quantizer; registered: {sorted(quantizers)}")
        if r.lora or r.init:
            raise SpecError(f"base {format_spec(r)!r}: lora./init. keys do not apply here (use --rank)")
    if not rows:
        raise SpecError("no base quantizer to run: give --bases, e.g. 'nf:bits=4,blocksize=64'")
    return rows


def select_variants(text: str | None) -> list[str]:
    """Adapter variant names (when ``text`` is None: every registered one, the configuration's default
    variant first as the reference); unknown ones are a one-line error."""
    from lqmod.config import LoRAConfig

    default = LoRAConfig(r=1, alpha=1.0).adapter
    known = sorted(get_registry().adapters(), key=lambda n: n != default)
    if text is None:
        return known
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SpecError(f"--adapters {text!r}: unknown variant(s) {unknown}; registered: {known}")
    if len(set(names)) != len(names):
        raise SpecError(f"--adapters {text!r} names a variant twice")
    return names


# -- the two objectives --------------------------------------------------------------------


@dataclass
class Task:
    """A loaded model and its objective: ``train(model, label)`` runs the fixed budget,
    ``score(model)`` the metric; ``stats`` holds calibration statistics when bases need them."""

    name: str
    kind: str
    model: nn.Module
    targets: dict[str, Any]  # TargetConfig fields for quantize_model
    target_names: list[str]
    metric: str
    objective: str
    train: Callable[[nn.Module, str], dict[str, Any]]
    score: Callable[[nn.Module], float]
    probe: dict[str, torch.Tensor]
    stats: Callable[[set[str]], dict[str, LayerStats]]
    settings: dict[str, Any] = field(default_factory=dict)


def _encoder_task(s: AdapterBenchSettings) -> Task:
    from lqmod.bench import finetune
    from lqmod.bench.run import BenchSettings, load_workload

    bs = BenchSettings(model=s.model, n_calib=s.n_calib, n_eval=s.n_eval, finetune_steps=s.steps or 0,
                       seed=s.seed, progress=s.progress, batch_size=s.batch or 16)  # fmt: skip
    w = load_workload(bs)
    batches, loss_fn, objective, _ = finetune._objective(w, bs.resolved(w.kind))
    assert s.lr is not None
    lr = s.lr

    def train(model: nn.Module, label: str) -> dict[str, Any]:
        return finetune._train(model, batches, loss_fn, lr, label, s.progress)

    def stats(needs: set[str]) -> dict[str, LayerStats]:
        if needs - {"hessian"}:
            raise SpecError(f"the adapters bench gathers Hessians only; a base needs {sorted(needs)}")
        return {n: LayerStats(hessian=w.grams[n], n_tokens=w.n_tokens[n]) for n in w.targets}

    probe = {k: v[:4] for k, v in batches[0].items() if k != "teacher"}
    targets = {"include": tuple(f"^{re.escape(n)}$" for n in w.targets), "exclude": ()}
    return Task(w.name, w.kind, w.model, targets, list(w.targets), "cosine", objective, train,
                lambda m: finetune._fidelity(w, m), probe, stats,
                {"train_sentences": sum(len(b["input_ids"]) for b in batches), "eval_sentences": len(w.splits.eval),
                 "calib_sentences": len(w.splits.calib)})  # fmt: skip


def _causal_task(s: AdapterBenchSettings, model: nn.Module, tokenizer: Any, name: str) -> Task:
    from lqmod.calibration.command import compute_stats
    from lqmod.calibration.text import calibration_batches
    from lqmod.config import TargetConfig
    from lqmod.evaluation import stream_perplexity
    from lqmod.model import find_targets
    from lqmod.train import FinetuneConfig, train_causal_lm
    from lqmod.train.data import pack_records, source_text

    ids = tokenizer(source_text("wikitext2"), add_special_tokens=False)["input_ids"]
    eval_ids = torch.tensor(ids[: s.eval_tokens], dtype=torch.long)
    data = pack_records(tokenizer, "wikitext2-valid", s.seq_len)
    assert s.steps is not None and s.batch is not None and s.lr is not None
    cfg = FinetuneConfig(steps=s.steps, micro_batch_size=s.batch, seq_len=s.seq_len, lr=s.lr, seed=s.seed,
                         precision="fp32", warmup_steps=0, eval_every=0)  # fmt: skip
    names = find_targets(model, TargetConfig())

    def train(m: nn.Module, label: str) -> dict[str, Any]:
        t = time.perf_counter()
        res = train_causal_lm(m, data, cfg, progress=s.progress)
        seconds = time.perf_counter() - t
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        return {"loss": res.losses, "trainable_params": trainable, "seconds_per_step": seconds / max(s.steps or 1, 1),
                "tokens_per_s": res.tokens_per_s}  # fmt: skip

    def score(m: nn.Module) -> float:
        return float(stream_perplexity(m, eval_ids, context=s.eval_context, progress=s.progress).ppl)

    def stats(needs: set[str]) -> dict[str, LayerStats]:
        assert s.n_calib is not None
        batches = calibration_batches(tokenizer, "causal-lm", "wikitext2", s.n_calib, length=s.seq_len)
        return compute_stats(model, names, batches, needs, text="wikitext2 validation", progress=s.progress)

    objective = (f"next-token NLL on packed wikitext2-valid windows ({s.batch} x {s.seq_len} tokens/step); "
                 f"perplexity on the first {s.eval_tokens} tokens of WikiText-2 raw test, context {s.eval_context}")
    return Task(name, "causal-lm", model, {}, names, "perplexity", objective, train, score,
                {"input_ids": eval_ids[:64].reshape(1, -1)}, stats)  # fmt: skip


def load_task(s: AdapterBenchSettings) -> tuple[Task, AdapterBenchSettings]:
    from lqmod.hf import load_local_model, resolve_model

    if resolve_model(s.model).kind != "encoder":  # a causal LM, or a directory that says which it is
        torch.manual_seed(s.seed)
        model, tokenizer, where = load_local_model(s.model)
        if where.kind == "causal-lm":
            s = s.resolved(where.kind)
            return _causal_task(s, model.eval(), tokenizer, where.name), s
        del model
    s = s.resolved("encoder")
    return _encoder_task(s), s


# -- measuring -----------------------------------------------------------------------------


def _first_output(model: nn.Module, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**probe)
    return (out[0] if isinstance(out, tuple) else next(iter(out.values()))).float()


def _own_params(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Each variant's parameters beyond LoRA's ``A`` and ``B`` (DoRA's magnitude, IEC's scalars ...), per name."""
    from lqmod.model import iter_lora_layers

    out: dict[str, list[torch.Tensor]] = {}
    for _, layer in iter_lora_layers(model):
        for pname, p in layer.adapter.named_parameters():
            if pname not in ("lora_A", "lora_B"):
                out.setdefault(pname, []).append(p.detach().clone())
    return out


def _moved(before: dict[str, list[torch.Tensor]], after: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    """Mean over layers of mean |p - p0| (and of mean |p0|): how far training moved each own parameter."""
    out = {}
    for pname, olds in before.items():
        news = after[pname]
        change = [float((n - o).abs().mean()) for o, n in zip(olds, news, strict=True)]
        init = [float(o.abs().mean()) for o in olds]
        out[pname] = {"mean_abs_change": sum(change) / len(change), "mean_abs_initial": sum(init) / len(init),
                      "layers": len(olds)}  # fmt: skip
    return out


@contextmanager
def _clock() -> Iterator[dict[str, float]]:
    res: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield res
    finally:
        res["wall_s"] = time.perf_counter() - wall
        res["cpu_s"] = time.process_time() - cpu


def _rss_bytes() -> int | None:
    try:
        from lqmod.bench.peak_rss import current_rss_bytes

        return current_rss_bytes()
    except (OSError, RuntimeError):
        return None


def layer_timing(model: nn.Module, variants: list[str], *, tokens: tuple[int, int] = (4, 128),
                 reps: int = 9) -> dict[str, Any]:  # fmt: skip
    """Forward + backward of the model's largest adapted layer under each variant, interleaved rep
    by rep so machine load hits them alike; median wall seconds (and CPU seconds)."""
    from lqmod.model import iter_lora_layers

    name, layer = max(iter_lora_layers(model), key=lambda kv: kv[1].in_features * kv[1].out_features)
    layers = {}
    for v in variants:
        holder = nn.Sequential(copy.deepcopy(layer))
        from lqmod.model import convert_adapters

        convert_adapters(holder, v)
        layers[v] = holder
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*tokens, layer.in_features, generator=g, requires_grad=True)
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(reps):
        for v, m in layers.items():
            with _clock() as c:
                m(x).sum().backward()
            wall[v].append(c["wall_s"])
            cpu[v].append(c["cpu_s"])

    def med(ts: list[float]) -> float:
        return sorted(ts)[len(ts) // 2]

    return {"layer": name, "shape": [layer.out_features, layer.in_features], "tokens": tokens[0] * tokens[1],
            "reps": reps, "median_s": {v: med(t) for v, t in wall.items()},
            "median_cpu_s": {v: med(t) for v, t in cpu.items()}, "threads": torch.get_num_threads(),
            "loadavg": list(os.getloadavg())}  # fmt: skip


def _environment(load_start: tuple[float, float, float]) -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform(),
            "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg())}  # fmt: skip


def run_base(task: Task, s: AdapterBenchSettings, base: RowSpec, variants: list[str]) -> dict[str, Any]:
    """One base quantized once, then every variant trained from it; the base's JSON record."""
    from lqmod.model import convert_adapters, quantize_model

    registry = get_registry()
    spec = registry.quantizer(base.name)
    needs = set(spec.needs)
    stats = task.stats(needs) if needs else None
    model = copy.deepcopy(task.model)
    with _clock() as qclock:
        report = quantize_model(model, base.name, dict(base.config), lora={"r": s.rank, "alpha": 2.0 * s.rank},
                                targets=task.targets or None, stats=stats, seed=s.seed,
                                progress=s.progress)  # fmt: skip
    ref = _first_output(model, task.probe)
    before = task.score(model)
    rec: dict[str, Any] = {"base": format_spec(base), "bits_per_param": report.bits_per_param,
                           "n_layers": len(report.layers), "quantize": qclock, "metric_before": before,
                           "variants": {}}  # fmt: skip
    for variant in variants:
        m = copy.deepcopy(model)
        convert_adapters(m, variant)  # a no-op for layers already of that variant
        step0 = float((_first_output(m, task.probe) - ref).abs().max())
        own0 = _own_params(m)
        torch.manual_seed(s.seed)
        rss0 = _rss_bytes()
        with rss_peak_meter() as rss, _clock() as clock:
            run = task.train(m, f"{base.name}{base.config.get('bits', '')} {variant}")
        after = task.score(m)
        rec["variants"][variant] = {
            **run,
            "metric_after": after,
            "step0_max_output_diff": step0,
            "train_wall_s": clock["wall_s"],
            "train_cpu_s": clock["cpu_s"],
            "train_peak_rss_delta_bytes": rss["delta"],
            "train_peak_rss_bytes": None if rss0 is None or rss["delta"] is None else rss0 + rss["delta"],
            "own_params": _moved(own0, _own_params(m)),
        }
        if s.progress:
            tqdm.write(f"{rec['base']} {variant}: {task.metric} {before:.5g} -> {after:.5g}, "
                       f"{clock['cpu_s']:.0f} CPU s")  # fmt: skip
        del m
    if s.layer_timing:
        rec["layer_timing"] = layer_timing(model, variants)
    return rec


def run_adapter_bench(settings: AdapterBenchSettings) -> dict[str, Any]:
    """Run every base x variant; returns the JSON-able results and writes JSON, Markdown and PNG."""
    from lqmod.bench.adapters_report import write_report

    load_start = os.getloadavg()
    variants = select_variants(settings.adapters)  # refused before the model loads
    t0 = time.perf_counter()
    task, s = load_task(settings)
    bases = select_bases(s.bases, task.kind)
    name = s.name or f"adapters_{task.name}"
    records: list[dict[str, Any]] = []
    out: dict[str, Any] = {}
    for b in tqdm(bases, desc=f"adapters {task.name}", unit="base", disable=not s.progress):
        records.append(run_base(task, s, b, variants))
        out = {
            "schema": SCHEMA,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"name": task.name, "kind": task.kind, "n_target_layers": len(task.target_names)},
            "metric": task.metric,
            "objective": task.objective,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
            "lora": {"r": s.rank, "alpha": 2.0 * s.rank, "initializer": "registry default (LoRAConfig)"},
            "variants": variants,
            "bases": records,
            "complete": len(records) == len(bases),
            "task": task.settings,
            "environment": _environment(load_start),
            "seconds": time.perf_counter() - t0,
        }
        # Written after every base: a long run interrupted keeps what it measured.
        write_report(out, Path(s.out), name)
    return out
