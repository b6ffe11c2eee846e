"""The quantizer x initializer finetuning benchmark on a causal LM (SmolLM2-135M by default).

Every row is one way to get a LoRA-trainable model out of the same fp model: a quantizer
(NF 4/3/2, sequential OPTQ 3/2, QuIP#-like 3/2, an ILP plan over several quantizers at an
average-bits budget) with the ``default`` LoRA initializer (``B = 0``: the step-0 model *is*
the quantized model) or with ``lq-lora`` (the adapter starts at the low-rank part of an LQ
decomposition made with that layer's own quantizer), plus two baselines: bitsandbytes + PEFT
QLoRA NF4 and PEFT LoRA on the dense fp32 model. Each row then trains its adapters for the
same steps on the same packed windows (same seed, rank, alpha, learning rate) with
:func:`lqmod.train.train_causal_lm`, and is scored before and after by
:func:`lqmod.evaluation.stream_perplexity` on the same held-out token stream.

Resumable row by row: each finished row is written at once (atomically) to
``<out>/rows/<row>.json`` with a fingerprint of the row and of every setting that changes its
numbers; a rerun skips rows whose file has the current fingerprint. Under the cache folder
live what is expensive to recompute: calibration statistics (:class:`lqmod.calibration.StatsCache`),
error tables of the plans (:class:`lqmod.allocation.TableCache`), the plans, the quantized
models with their initial adapters (:func:`lqmod.io.save_checkpoint`), and the training runs'
resumable states (a row interrupted mid-training resumes from its newest state).
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

__all__ = [
    "DEFAULT_ROWS",
    "FULL",
    "QUICK",
    "ROWS",
    "BenchRun",
    "LMBenchSettings",
    "LMRow",
    "aggregate",
    "default_cache_dir",
    "run_benchmark",
    "select_rows",
    "write_outputs",
]

RESULTS_VERSION = 1
RowKind = Literal["quantizer", "plan", "bnb", "fp-lora"]
Calibration = Literal["none", "hessian", "sequential"]


@dataclass(frozen=True)
class LMBenchSettings:
    """Everything that changes a row's numbers (all of it goes into the row fingerprints)."""

    model: str = "smollm2"
    train_text: str = "wikitext2-valid"  # lqmod.train.data source: the WikiText-2 validation split
    eval_text: str = "wikitext2"  # lqmod.train.data source: the WikiText-2 *raw test* split
    calib_text: str = "wikitext2"  # lqmod.calibration.text source: the WikiText-2 validation split
    eval_tokens: int = 2048
    eval_context: int = 256
    calib_windows: int = 32
    calib_len: int = 256
    steps: int = 12
    micro_batch: int = 4
    seq_len: int = 128
    lr: float = 1e-3
    # No warmup: transformers' warmup gives step 0 a learning rate of 0, a twelfth of this budget.
    warmup: int = 0
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0
    lq_iters: int = 10  # lq-lora alternations (quantize, low-rank fit); its tolerance stops it earlier
    optq_group: int = 64
    # The first token of each calibration window (the attention sink) carries this share of every
    # Hessian's trace: OPTQ-3 loses to NF3 on SmolLM2 without it (lqmod.calibration.sinks).
    sink_share: float | None = 0.5
    plan_error: str = "output"  # error measure of the plans' tables (falls back to frobenius if absent)
    name: str = "full"

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        keep = {k: v for k, v in asdict(self).items() if k != "name"}
        return _digest(keep)


FULL = LMBenchSettings()
# Tiny settings for tests and smoke runs (meant for a tiny model, seconds per row).
QUICK = replace(
    FULL, eval_tokens=384, eval_context=64, calib_windows=4, calib_len=32, steps=3, micro_batch=2, seq_len=32,
    lr=1e-2, rank=4, alpha=8.0, lq_iters=2, name="quick",
)  # fmt: skip


@dataclass(frozen=True)
class LMRow:
    """One row: how the trainable model is built."""

    name: str
    kind: RowKind
    quantizer: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    initializer: str = "default"
    calibration: Calibration = "none"
    budget: float | None = None  # plan rows: average bits per parameter
    plan_error: str | None = None  # plan rows: the table's error measure (None: the settings')
    description: str = ""

    def spec(self) -> dict[str, Any]:
        spec = {
            "name": self.name, "kind": self.kind, "quantizer": self.quantizer, "config": dict(self.config),
            "initializer": self.initializer, "calibration": self.calibration, "budget": self.budget,
        }  # fmt: skip
        if self.plan_error is not None:  # absent otherwise, so earlier rows keep their fingerprints
            spec["plan_error"] = self.plan_error
        return spec


NF = {"blocksize": 64, "double_quant": True}


def _rows() -> list[LMRow]:
    rows: list[LMRow] = []
    for init in ("default", "lq-lora"):
        suffix = "" if init == "default" else "+lq-lora"
        for b in (4, 3, 2):
            rows.append(LMRow(f"nf{b}{suffix}", "quantizer", "nf", {"bits": b, **NF}, init,
                              description=f"NF{b}, blocks of 64, double-quantized scales"))
        for b in (3, 2):
            rows.append(LMRow(f"optq{b}{suffix}", "quantizer", "optq", {"bits": b, "sym": False}, init,
                              "sequential", description=f"OPTQ {b}-bit asymmetric, sequential calibration"))
        # OPTQ-3 at NF3's bits: byte scales (scale_bits=8) over groups of 96, 3.115 bits/param
        # against NF3's 3.127 (the optq3 row pays 3.297 for float16 scales over groups of 64).
        rows.append(LMRow(f"optq3-g96-s8{suffix}", "quantizer", "optq",
                          {"bits": 3, "sym": False, "group_size": 96, "scale_bits": 8}, init, "sequential",
                          description="OPTQ 3-bit asymmetric, groups of 96, byte scales, sequential calibration"))
        for b in (3, 2):
            rows.append(LMRow(f"quip{b}{suffix}", "quantizer", "quip", {"bits": b}, init, "hessian",
                              description=f"QuIP#-like {b}-bit, Hessians of the fp model"))
        for budget in (3.25, 2.75):
            rows.append(LMRow(f"plan{budget}{suffix}", "plan", None, {}, init, "hessian", budget,
                              description=f"ILP plan at {budget} bits/param over NF and OPTQ options"))
    rows = [r if r.initializer == "default" else replace(r, description=r.description + "; lq-lora init")
            for r in rows]
    # The best OPTQ-3 setting of the sink study at NF3's bits: byte scales over groups of 96 with
    # act-order (static groups: no g_idx stored, still 3.115 bits) and damping 0.1.
    rows.append(LMRow("optq3-g96-s8-act", "quantizer", "optq",
                      {"bits": 3, "sym": False, "group_size": 96, "scale_bits": 8, "desc_act": True,
                       "static_groups": True, "damp": 0.1}, "default", "sequential",
                      description="OPTQ 3-bit asymmetric, groups of 96, byte scales, act-order (static groups), "
                      "damping 0.1, sequential calibration"))
    # Part 2 of issue 11: the same plans from a weight-space table (one quantization per option
    # serves both measures, so these cost only their training).
    for budget in (3.25, 2.75):
        rows.append(LMRow(f"plan{budget}-frob", "plan", None, {}, "default", "hessian", budget, "frobenius",
                          description=f"ILP plan at {budget} bits/param, weight-space (Frobenius) error table"))
    # ...and from the K-FAC table: each layer's output error weighed by the loss's squared
    # output gradient, so layers compare by what they cost the loss (their table needs a Fisher pass).
    for budget in (3.25, 2.75):
        rows.append(LMRow(f"plan{budget}-kfac", "plan", None, {}, "default", "hessian", budget, "kfac",
                          description=f"ILP plan at {budget} bits/param, K-FAC (Fisher-weighted output) error table"))
    rows.append(LMRow("bnb-nf4", "bnb", None, {"bits": 4, **NF},
                      description="bitsandbytes Linear4bit NF4 (blocks of 64, double quant) + PEFT LoRA (QLoRA)"))
    rows.append(LMRow("fp-lora", "fp-lora", description="PEFT LoRA on the dense fp32 model"))
    # Sort: the cheap rows first, so a run cut short has the most rows.
    order = {"nf": 0, "fp-lora": 1, "bnb": 2, "quip": 3, "optq": 4, "plan": 5}
    return sorted(rows, key=lambda r: (order.get(r.quantizer or r.kind, 9), r.initializer != "default"))


ROWS: list[LMRow] = _rows()
# The rows a plain run computes: about an hour on an idle 2-core CPU at the FULL settings with
# --eval-tokens 4096 (measured 2026-12-01, torch 2 threads, row by row: ~1 min of training and
# evaluation per row; quantizing NF 0.5-1.2 min, lq-lora over NF ~0.7 min, sequential OPTQ 2.5
# min, QuIP#-like 7 min, the plans' error table 4.6 min shared by all four plan rows). The rows
# left out are the lq-lora rows over OPTQ, QuIP and the plans: lq-lora re-runs the Hessian-aware
# quantizer up to lq_iters times per layer (estimated 25 min per OPTQ/plan row, over an hour per
# QuIP row); select them by name or with --rows all.
DEFAULT_ROWS = ("fp-lora", "bnb-nf4", "nf4", "nf3", "nf2", "nf4+lq-lora", "nf3+lq-lora", "nf2+lq-lora", "quip3",
                "quip2", "optq3", "optq2", "optq3-g96-s8", "optq3-g96-s8-act", "plan3.25", "plan2.75", "plan3.25-frob",
                "plan2.75-frob", "plan3.25-kfac", "plan2.75-kfac")  # fmt: skip


def select_rows(patterns: str | Sequence[str] | None, rows: Sequence[LMRow] = ROWS) -> list[LMRow]:
    """Rows whose name matches one of the comma-separated names or shell patterns (``nf*``);
    None: :data:`DEFAULT_ROWS`; ``"all"``: every row."""
    if patterns is None:
        return [r for r in rows if r.name in DEFAULT_ROWS]
    if patterns == "all":
        return list(rows)
    pats = [p.strip() for p in (patterns.split(",") if isinstance(patterns, str) else patterns) if p.strip()]
    if not pats:
        raise ValueError("--rows is empty; give row names or patterns, e.g. nf3,nf3+lq-lora,fp-lora or 'nf*'")
    for p in pats:
        if not any(fnmatch.fnmatchcase(r.name, p) for r in rows):
            raise ValueError(f"row {p!r} matches no row; rows: {', '.join(r.name for r in rows)}")
    return [r for r in rows if any(fnmatch.fnmatchcase(r.name, p) for p in pats)]


def default_cache_dir() -> Path:
    """``$LQMOD_CACHE/finetune_lm`` if set, else ``~/.cache/lqmod/finetune_lm``."""
    env = os.environ.get("LQMOD_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "lqmod") / "finetune_lm"


# -- small helpers ---------------------------------------------------------------------------


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dump(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=False, allow_nan=True, default=str) + "\n"


def _lqmod_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lqmod")
    except metadata.PackageNotFoundError:
        return "unknown"


def row_fingerprint(row: LMRow, settings: LMBenchSettings) -> str:
    return _digest({"v": RESULTS_VERSION, "row": row.spec(), "settings": settings.fingerprint()})


def _quant_key(row: LMRow, s: LMBenchSettings) -> str:
    """What the quantized model (with its initial adapters) depends on: not the training settings."""
    used = {
        "model": s.model, "row": row.spec(), "rank": s.rank, "alpha": s.alpha, "seed": s.seed,
        "lq_iters": s.lq_iters if row.initializer == "lq-lora" else None,
    }  # fmt: skip
    if row.calibration != "none":
        used.update(calib_text=s.calib_text, calib_windows=s.calib_windows, calib_len=s.calib_len,
                    sink_share=s.sink_share)
    if row.kind == "plan":
        used.update(plan_error=_plan_error(row, s))
    if row.quantizer == "optq" or row.kind == "plan":
        used.update(optq_group=s.optq_group)
    return _digest(used)


def _row_file(out: Path, name: str) -> Path:
    return out / "rows" / f"{name}.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- the shared inputs of every row (loaded once per process, only when a row runs) -----------


class _Context:
    def __init__(self, settings: LMBenchSettings, cache: Path, progress: bool) -> None:
        self.s = settings
        self.cache = cache
        self.progress = progress
        self._fp: tuple[Any, Any, Any] | None = None
        self._hessians: dict[str, Any] | None = None
        self._with_fisher: dict[str, Any] | None = None
        self._eval_ids: torch.Tensor | None = None
        self._train: Any = None
        self._calib: list[dict[str, torch.Tensor]] | None = None

    def fp(self) -> tuple[nn.Module, Any, Any]:
        if self._fp is None:
            from lqmod.hf import load_local_model

            self._fp = load_local_model(self.s.model)
            if self._fp[2].kind != "causal-lm":
                raise ValueError(f"model {self.s.model!r} is not a causal LM (it is {self._fp[2].kind}): "
                                 "this benchmark measures perplexity")
        return self._fp

    @property
    def model(self) -> nn.Module:
        return cast(nn.Module, self.fp()[0])

    @property
    def tokenizer(self) -> Any:
        return self.fp()[1]

    def targets(self) -> list[str]:
        from lqmod.config import TargetConfig
        from lqmod.model import find_targets

        return find_targets(self.model, TargetConfig())

    def eval_ids(self) -> torch.Tensor:
        if self._eval_ids is None:
            from lqmod.train.data import source_text

            ids = self.tokenizer(source_text(self.s.eval_text), add_special_tokens=False)["input_ids"]
            if len(ids) < self.s.eval_tokens:
                raise ValueError(f"eval text {self.s.eval_text!r} has {len(ids)} tokens, fewer than "
                                 f"eval_tokens={self.s.eval_tokens}")
            self._eval_ids = torch.tensor(ids[: self.s.eval_tokens], dtype=torch.long)
        return self._eval_ids

    def train(self) -> Any:
        if self._train is None:
            from lqmod.train.data import pack_records

            if self.s.train_text == self.s.eval_text:
                raise ValueError(f"train text {self.s.train_text!r} is the eval text: train on held-out text")
            self._train = pack_records(self.tokenizer, self.s.train_text, self.s.seq_len)
        return self._train

    def calib(self) -> list[dict[str, torch.Tensor]]:
        if self._calib is None:
            from lqmod.calibration.text import calibration_batches

            self._calib = calibration_batches(
                self.tokenizer, "causal-lm", self.s.calib_text, self.s.calib_windows, length=self.s.calib_len
            )
        return self._calib

    def sink(self) -> Any:
        from lqmod.calibration.sinks import SinkWeighting

        return None if self.s.sink_share is None else SinkWeighting(share=self.s.sink_share)

    def hessians(self) -> dict[str, Any]:
        """``X^T X`` of every target's input in the fp model, through the stats cache."""
        if self._hessians is None:
            from lqmod.calibration.command import compute_stats

            self._hessians = compute_stats(
                self.model, self.targets(), self.calib(), {"hessian"}, cache_dir=str(self.cache / "stats"),
                text=self.s.calib_text, progress=self.progress, sink=self.sink(),
            )  # fmt: skip
        return self._hessians

    def hessians_and_fishers(self) -> dict[str, Any]:
        """:meth:`hessians` plus each target's diagonal Fisher on the same calibration windows
        (the ``kfac`` table reads both; the Fisher is cached beside the Hessians)."""
        if self._with_fisher is None:
            from lqmod.calibration.command import compute_stats

            self._with_fisher = compute_stats(
                self.model, self.targets(), self.calib(), {"hessian", "fisher"}, cache_dir=str(self.cache / "stats"),
                text=self.s.calib_text, progress=self.progress, sink=self.sink(),
            )  # fmt: skip
        return self._with_fisher


# -- building one row's trainable model --------------------------------------------------------


def _lora(row: LMRow, s: LMBenchSettings) -> dict[str, Any]:
    lora: dict[str, Any] = {"r": s.rank, "alpha": s.alpha, "initializer": row.initializer}
    if row.initializer == "lq-lora":
        lora["initializer_config"] = {"max_iters": s.lq_iters}
    return lora


def _config(row: LMRow, s: LMBenchSettings) -> dict[str, Any]:
    cfg = dict(row.config)
    if row.quantizer == "optq":
        cfg.setdefault("group_size", s.optq_group)
    return cfg


def _plan_options(s: LMBenchSettings) -> list[Any]:
    """What the plans choose from: NF 2/3/4 (blocks 64 and 128, double quant) and OPTQ 2/3
    (groups of ``optq_group``, symmetric and asymmetric, calibrated on the fp model's Hessians).

    No ``lq`` options: the low-rank part is the ``lq-lora`` initializer's job. No QuIP#-like
    options: quantizing one 576 x 576 matrix takes it ~10-70 s on the 2-core CPU, so its three
    options would add hours to the table (the quip rows measure it on its own).
    """
    from lqmod.config import validate_config
    from lqmod.plugins import get_registry
    from lqmod.types import Option

    reg = get_registry()
    raw: list[tuple[str, dict[str, Any]]] = [
        ("nf", {"bits": b, "blocksize": bs, "double_quant": True}) for b in (2, 3, 4) for bs in (64, 128)
    ]
    raw += [("optq", {"bits": b, "group_size": s.optq_group, "sym": sym}) for b in (2, 3) for sym in (True, False)]
    return [Option(q, validate_config(reg.quantizer(q).config_model, c, what=f"{q} plan option")) for q, c in raw]


def _plan_error(row: LMRow, s: LMBenchSettings) -> str:
    return row.plan_error if row.plan_error is not None else s.plan_error


def _plan(row: LMRow, ctx: _Context) -> tuple[Any, dict[str, Any]]:
    """The row's plan, cached as JSON (the error table under it is cached per option too)."""
    from lqmod.allocation import TableCache, allocate_table, build_model_error_table
    from lqmod.config import Plan

    path = ctx.cache / "plans" / f"{row.name}-{_quant_key(row, ctx.s)[:16]}.json"
    if (data := _read_json(path)) is not None:
        plan = Plan.model_validate(data["plan"])
        return plan, data["info"]
    kwargs: dict[str, Any] = {}
    measure = "frobenius"
    # The output-error measure is new; where this lqmod lacks it the plan says what it used.
    if "error" in inspect.signature(build_model_error_table).parameters:
        kwargs["error"] = measure = _plan_error(row, ctx.s)
    stats = ctx.hessians_and_fishers() if measure == "kfac" else ctx.hessians()
    table = build_model_error_table(
        ctx.model, options=_plan_options(ctx.s), stats=stats, cache=TableCache(ctx.cache / "tables"),
        progress=ctx.progress, **kwargs,
    )  # fmt: skip
    assert row.budget is not None
    plan, summary = allocate_table(table, row.budget, allocator="ilp")
    info = {
        "error_measure": measure,
        "budget_bits_per_param": row.budget,
        "achieved_bits_per_param": summary["achieved"]["bits_per_param"],
        "by_quantizer": summary["by_quantizer"],
        "by_option": summary["by_option"],
        "total_error": summary["total_error"],
        "solver_status": summary["status"],
    }
    _atomic_write(path, _dump({"plan": json.loads(plan.model_dump_json()), "info": info}))
    return plan, info


def _quantized(row: LMRow, ctx: _Context, notes: list[str]) -> tuple[nn.Module, dict[str, Any]]:
    """The quantized model with its initial adapters: from the checkpoint cache, or built and cached."""
    from lqmod.calibration import StatsCache, quantize_model_sequential
    from lqmod.io import load_checkpoint, read_manifest, save_checkpoint
    from lqmod.model import quantize_model

    s = ctx.s
    ckpt = ctx.cache / "checkpoints" / f"{row.name}-{_quant_key(row, s)[:16]}"
    if (ckpt / "lqmod.json").is_file():
        t0 = time.perf_counter()
        model = load_checkpoint(ckpt)
        built = dict(read_manifest(ckpt).get("extra", {}).get("finetune_lm", {}))
        built.update(cached=True, load_seconds=time.perf_counter() - t0)
        return model, built
    model = copy.deepcopy(ctx.model)
    lora = _lora(row, s)
    info: dict[str, Any] = {"cached": False}
    t0 = time.perf_counter()
    if row.kind == "plan":
        plan, info["plan"] = _plan(row, ctx)
        t1 = time.perf_counter()
        quantize_model(model, plan=plan, stats=ctx.hessians(), lora=lora, seed=s.seed, progress=ctx.progress)
        info["plan_seconds"] = t1 - t0
    elif row.calibration == "sequential":
        quantize_model_sequential(
            model, row.quantizer, _config(row, s), batches=ctx.calib(), lora=lora, seed=s.seed,
            cache=StatsCache(ctx.cache / "stats"), progress=ctx.progress, sink=ctx.sink(),
        )  # fmt: skip
    else:
        stats = ctx.hessians() if row.calibration == "hessian" else None
        quantize_model(model, row.quantizer, _config(row, s), lora=lora, stats=stats, seed=s.seed,
                       progress=ctx.progress)
    info["quantize_seconds"] = time.perf_counter() - t0
    save_checkpoint(model, ckpt, overwrite=True, extra={"source_model": s.model, "finetune_lm": info})
    return model, info


def _peft_lora_config(s: LMBenchSettings, targets: list[str]) -> Any:
    from peft import LoraConfig

    # PEFT types lora_alpha as int; the scale alpha / r is the same for a float.
    return LoraConfig(r=s.rank, lora_alpha=cast(int, s.alpha), target_modules=targets, lora_dropout=0.0)


def _fp_lora(ctx: _Context, notes: list[str]) -> nn.Module:
    from peft import get_peft_model

    from lqmod.bench.finetune import peft_gptqmodel_check_bypassed

    model = copy.deepcopy(ctx.model)
    torch.manual_seed(ctx.s.seed)  # PEFT draws A (Kaiming-uniform) from the global generator
    with peft_gptqmodel_check_bypassed(notes):
        return cast(nn.Module, get_peft_model(model, _peft_lora_config(ctx.s, ctx.targets())))


def _bnb(row: LMRow, ctx: _Context, notes: list[str]) -> nn.Module:
    from lqmod.bench.finetune import bnb_peft_model

    torch.manual_seed(ctx.s.seed)
    return bnb_peft_model(ctx.model, ctx.targets(), dict(row.config), r=ctx.s.rank, alpha=ctx.s.alpha, notes=notes)


def storage_bits(model: nn.Module) -> tuple[float, int]:
    """(bits per parameter, parameters) over the adapted/quantized linear weights, metadata included.

    lqmod layers: each ``QuantizedWeight.bits_per_param``; bitsandbytes ``Linear4bit``: the packed
    codes plus absmax (8-bit codes + their float32 scales + offset when double-quantized); dense
    layers under PEFT LoRA: the weight's dtype. Adapters are not counted (they are the same rank
    everywhere).
    """
    from lqmod.model import iter_lora_layers

    bits, params = 0.0, 0
    for _, m in iter_lora_layers(model):
        n = m.in_features * m.out_features
        bits += m.qweight.bits_per_param() * n
        params += n
    if params:
        return bits / params, params
    for mod in model.modules():
        base = getattr(mod, "base_layer", None)
        if base is None or not hasattr(base, "weight"):
            continue
        w = base.weight
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            n = int(math.prod(qs.shape))
            b = w.numel() * w.element_size() * 8 + qs.absmax.numel() * qs.absmax.element_size() * 8
            if getattr(qs, "nested", False) and qs.state2 is not None:
                b += qs.state2.absmax.numel() * qs.state2.absmax.element_size() * 8 + 32  # + the offset
            bits += b
        else:
            n = w.numel()
            bits += n * w.element_size() * 8
        params += n
    return (bits / params if params else math.nan), params


# -- one row -----------------------------------------------------------------------------------


def _train_config(s: LMBenchSettings) -> Any:
    from lqmod.train import FinetuneConfig

    return FinetuneConfig(
        steps=s.steps, micro_batch_size=s.micro_batch, seq_len=s.seq_len, lr=s.lr, seed=s.seed, precision="fp32",
        warmup_steps=s.warmup, save_every=max(1, s.steps // 4), eval_every=0,
    )  # fmt: skip


def _perplexity(model: nn.Module, ctx: _Context) -> dict[str, Any]:
    from lqmod.evaluation import stream_perplexity

    t0 = time.perf_counter()
    res = stream_perplexity(model, ctx.eval_ids(), context=ctx.s.eval_context, progress=ctx.progress)
    return {"ppl": res.ppl, "nll": res.nll, "tokens": res.tokens, "seconds": time.perf_counter() - t0}


def compute_row(row: LMRow, ctx: _Context) -> dict[str, Any]:
    """Build, evaluate, train and re-evaluate one row (its training resumes from saved states)."""
    from lqmod.bench.memory import resident_bytes, rss_peak_meter
    from lqmod.train import train_causal_lm
    from lqmod.train.state import latest_state

    s = ctx.s
    fp = row_fingerprint(row, s)
    notes: list[str] = []
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    build: dict[str, Any] = {}
    if row.kind == "fp-lora":
        model = _fp_lora(ctx, notes)
    elif row.kind == "bnb":
        model = _bnb(row, ctx, notes)
    else:
        model, build = _quantized(row, ctx, notes)
    build_seconds = time.perf_counter() - t0
    bits, n_params = storage_bits(model)
    run_dir = ctx.cache / "runs" / f"{row.name}-{fp[:16]}"
    before_file = run_dir / "before.json"
    # An interrupted row resumes from its newest training state (and its stored "before").
    before = _read_json(before_file) if latest_state(run_dir) is not None else None
    resume = before is not None
    if before is None:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        before = _perplexity(model, ctx)
        _atomic_write(before_file, _dump(before))
    cfg = _train_config(s)
    train = ctx.train()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with rss_peak_meter() as rss:
        result = train_causal_lm(model, train, cfg, run_dir=run_dir, resume=resume, progress=ctx.progress)
    train_seconds = time.perf_counter() - t0
    if result.resumed_from:
        notes.append(f"training resumed from step {result.resumed_from}; tokens/s covers the resumed steps only")
    after = _perplexity(model, ctx)
    return {
        "row": row.name,
        "status": "ok",
        "fingerprint": fp,
        "description": row.description,
        "spec": row.spec(),
        "bits_per_param": bits,
        "quantized_params": n_params,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "resident_bytes": resident_bytes(model),
        "ppl_before": before["ppl"],
        "ppl_after": after["ppl"],
        "eval": {"before": before, "after": after},
        "loss": list(result.losses),
        "train_tokens": cfg.tokens_per_step * cfg.steps,
        "tokens_per_s": result.tokens_per_s,
        "peak_rss_delta_bytes": rss["delta"],
        # tokens/s depends on the machine's load: the other processes sharing its cores
        "torch_threads": torch.get_num_threads(),
        "load_average": {"before_training": list(load_before), "after_training": list(os.getloadavg())},
        "build": build,
        "seconds": {"build": build_seconds, "train": train_seconds, "total": time.perf_counter() - t_start},
        "notes": notes,
        "lqmod_version": _lqmod_version(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# -- the run -----------------------------------------------------------------------------------


@dataclass
class BenchRun:
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def run_benchmark(
    settings: LMBenchSettings,
    out: str | os.PathLike[str],
    *,
    rows: Sequence[LMRow] | None = None,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
    plots: bool = True,
    log: Callable[[str], None] | None = None,
) -> BenchRun:
    """Compute the rows that lack a current result under ``out``, then rewrite the summary files."""
    out = Path(out)
    log = log or _print
    cache_dir = Path(cache) if cache is not None else default_cache_dir()
    chosen = list(ROWS if rows is None else rows)
    ctx = _Context(settings, cache_dir, progress)
    run = BenchRun()
    for row in chosen:
        path = _row_file(out, row.name)
        old = _read_json(path)
        if old is not None and old.get("status") == "ok" and old.get("fingerprint") == row_fingerprint(row, settings):
            run.reused.append(row.name)
            continue
        log(f"[finetune_lm] row {row.name}: computing ({row.description})")
        try:
            res = compute_row(row, ctx)
        except (ImportError, RuntimeError, ValueError) as exc:
            # The row is recorded as failed (a rerun retries it); the others still run.
            res = {"row": row.name, "status": "failed", "fingerprint": row_fingerprint(row, settings),
                   "spec": row.spec(), "description": row.description, "reason": f"{type(exc).__name__}: {exc}"}
            run.failed.append(row.name)
            log(f"[finetune_lm] row {row.name}: FAILED {res['reason']}")
        else:
            run.computed.append(row.name)
            log(f"[finetune_lm] row {row.name}: ppl {res['ppl_before']:.2f} -> {res['ppl_after']:.2f}, "
                f"{res['bits_per_param']:.3f} bits/param, {res['tokens_per_s']:.0f} tokens/s, "
                f"{res['seconds']['total']:.0f} s")
        _atomic_write(path, _dump(res))
        # The summary is refreshed after every row, so an interrupted run still leaves a table.
        run.results = aggregate(settings, out)
        run.paths = write_outputs(run.results, out, plots=plots)
    run.results = aggregate(settings, out)
    run.paths = write_outputs(run.results, out, plots=plots)
    return run


def _print(msg: str) -> None:
    print(msg, flush=True)


def aggregate(settings: LMBenchSettings, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Every row file under ``out`` that belongs to ``settings`` (others are listed as stale)."""
    out = Path(out)
    rows: list[dict[str, Any]] = []
    stale: list[str] = []
    for row in ROWS:
        data = _read_json(_row_file(out, row.name))
        if data is None:
            continue
        if data.get("fingerprint") != row_fingerprint(row, settings):
            stale.append(row.name)
            continue
        rows.append(data)
    done = {r["row"] for r in rows if r["status"] == "ok"}
    missing = [r.name for r in ROWS if r.name not in done]
    return {
        "benchmark": "finetune_lm",
        "results_version": RESULTS_VERSION,
        "lqmod_version": _lqmod_version(),
        "settings": settings.describe(),
        "settings_fingerprint": settings.fingerprint(),
        "protocol": {
            "train": f"{settings.steps} steps x {settings.micro_batch} windows x {settings.seq_len} tokens of "
            f"{settings.train_text} (packed, seed {settings.seed}), AdamW lr {settings.lr}, cosine, "
            f"{settings.warmup} warmup steps, "
            f"grad clip 1.0, fp32; LoRA r={settings.rank} alpha={settings.alpha} on every linear but the LM head",
            "eval": f"stream_perplexity on the first {settings.eval_tokens} tokens of {settings.eval_text}, "
            f"disjoint windows of {settings.eval_context}",
            "calibration": f"{settings.calib_windows} windows of {settings.calib_len} tokens of "
            f"{settings.calib_text} (lqmod.calibration.text: the WikiText-2 validation split); "
            + ("natural X^T X" if settings.sink_share is None else
               f"each window's first token (attention sink) re-weighted to {settings.sink_share:g} of every "
               "Hessian's trace (lqmod.calibration.SinkWeighting)"),
            "memory": "peak RSS growth (VmHWM after a reset) during training, over the resident model: "
            "activations, gradients, optimizer state, materialized weights; allocator dependent",
        },
        "partial": bool(missing),
        "missing": missing,
        "stale": stale,
        "rows": rows,
    }


# -- outputs -----------------------------------------------------------------------------------

COLUMNS = ("row", "initializer", "bits/param", "ppl before", "ppl after", "Δ ppl", "train peak RSS Δ MiB",
           "tokens/s", "model MiB", "quantize s", "status")  # fmt: skip


def _f(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return format(v, fmt)


def table_cells(results: Mapping[str, Any]) -> list[list[str]]:
    cells = []
    for r in results["rows"]:
        spec = r.get("spec", {})
        if r["status"] != "ok":
            cells.append([r["row"], spec.get("initializer", ""), "", "", "", "", "", "", "", "",
                          f"{r['status']}: {r.get('reason', '')}"])
            continue
        build = r.get("build", {})
        build_s = build.get("quantize_seconds")
        cells.append([
            r["row"], spec.get("initializer", ""), _f(r["bits_per_param"], ".3f"), _f(r["ppl_before"], ".2f"),
            _f(r["ppl_after"], ".2f"), _f(r["ppl_after"] - r["ppl_before"], "+.2f"),
            _f((r["peak_rss_delta_bytes"] or 0) / 2**20 if r["peak_rss_delta_bytes"] is not None else None, ".0f"),
            _f(r["tokens_per_s"], ".0f" if r["tokens_per_s"] >= 100 else ".3g"), _f(r["resident_bytes"] / 2**20, ".0f"),
            _f(build_s, ".0f") + (" (cached)" if build.get("cached") else ""), "ok",
        ])  # fmt: skip
    return cells


def markdown(results: Mapping[str, Any]) -> str:
    s = results["settings"]
    lines = [f"# Finetuning benchmark: {s['model']} ({s['name']} settings)", ""]
    if results["partial"]:
        lines += [f"**PARTIAL**: {len(results['rows'])} of {len(ROWS)} rows; missing: "
                  f"{', '.join(results['missing'])}.", ""]
    base = QUICK if s["name"].startswith("quick") else FULL
    changed = {k: v for k, v in s.items() if k != "name" and base.describe().get(k) != v}
    if changed:
        lines += [f"Settings: `{base.name.upper()}` with " + ", ".join(f"{k}={v}" for k, v in changed.items())
                  + ".", ""]
    lines += [f"Results by lqmod {results['lqmod_version']}.", ""]
    for k, v in results["protocol"].items():
        lines.append(f"- {k}: {v}")
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table_cells(results)]
    plans = [r for r in results["rows"] if r["status"] == "ok" and r.get("build", {}).get("plan")]
    if plans:
        lines += ["", "Plans (share of the quantized parameters by quantizer):", ""]
        for r in plans:
            p = r["build"]["plan"]
            total = sum(v["params"] for v in p["by_quantizer"].values()) or 1
            mix = ", ".join(f"{q} {v['params'] / total:.0%}" for q, v in p["by_quantizer"].items())
            lines.append(f"- {r['row']}: {p['achieved_bits_per_param']:.3f} bits/param ({p['error_measure']} "
                         f"error table): {mix}")
            by_option = p.get("by_option") or {}
            counted = sorted(by_option.items(), key=lambda kv: -kv[1].get("params", 0))
            if counted:
                lines.append("  - options: " + ", ".join(
                    f"{label} {v.get('params', 0) / total:.0%}" for label, v in counted if v.get("params")))
    loads = [x for r in results["rows"] if r["status"] == "ok"
             for x in (r.get("load_average") or {}).values()]  # fmt: skip
    threads = sorted({r["torch_threads"] for r in results["rows"] if r.get("torch_threads")})
    if loads:
        lo, hi = min(v[0] for v in loads), max(v[0] for v in loads)
        lines += ["", f"Machine while training: torch threads {threads}, 1-minute load average {lo:.1f}-{hi:.1f} "
                  f"(tokens/s falls with the load; rows are comparable only at similar load)."]
    return "\n".join(lines) + "\n"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, version: str) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": f"lqmod {version}"})
    os.replace(tmp, path)


# The zoomed panel's range: the rows a user would train (fp32 is 37.5 on this protocol).
_ZOOM = (30.0, 200.0)


def _draw_ppl(ax: Any, ok: list[Mapping[str, Any]], zoom: bool) -> None:
    colors = {"default": "tab:blue", "lq-lora": "tab:red"}
    for r in ok:
        x, spec = r["bits_per_param"], r["spec"]
        if spec["kind"] == "fp-lora":
            ax.axhline(r["ppl_before"], color="black", ls=":", lw=1, label=f"fp32 {r['ppl_before']:.1f}")
            ax.axhline(r["ppl_after"], color="black", ls="--", lw=1, label=f"fp32 + LoRA {r['ppl_after']:.1f}")
            continue
        c = "tab:orange" if spec["kind"] == "bnb" else colors.get(spec["initializer"], "tab:gray")
        before = r["ppl_before"]
        if zoom and before > _ZOOM[1]:
            before = _ZOOM[1]  # the arrow enters from the top edge; the hollow marker is off the panel
        else:
            ax.scatter([x], [before], facecolors="none", edgecolors=c, s=45, zorder=3)
        ax.scatter([x], [r["ppl_after"]], color=c, s=45, zorder=3, edgecolor="black", linewidth=0.4)
        ax.annotate("", (x, r["ppl_after"]), (x, before),
                    arrowprops={"arrowstyle": "->", "color": c, "lw": 0.8, "alpha": 0.7})
        if not zoom or _ZOOM[0] <= r["ppl_after"] <= _ZOOM[1]:
            ax.annotate(r["row"], (x, r["ppl_after"]), fontsize=7, xytext=(4, -3), textcoords="offset points")
    ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)


def plot_ppl_vs_bits(results: Mapping[str, Any], path: Path) -> None:
    """Perplexity before (hollow) and after (filled) finetuning against storage bits per parameter:
    every row on a log scale (left), and the usable range zoomed (right)."""
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, NullLocator, ScalarFormatter

    plt = _plt()
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    fig, (ax_all, ax_zoom) = plt.subplots(1, 2, figsize=(14, 5.5))
    _draw_ppl(ax_all, ok, zoom=False)
    _draw_ppl(ax_zoom, ok, zoom=True)
    # Decades only: minor-tick labels of a range spanning 1e1..1e10 overlap into a smear.
    ax_all.yaxis.set_major_locator(LogLocator(base=10, numticks=12))
    ax_all.yaxis.set_minor_formatter(NullFormatter())
    ax_zoom.set_ylim(*_ZOOM)
    ax_zoom.yaxis.set_major_locator(FixedLocator([30, 40, 50, 60, 80, 100, 150, 200]))
    ax_zoom.yaxis.set_major_formatter(ScalarFormatter())
    ax_zoom.yaxis.set_minor_locator(NullLocator())
    for label, c in (("default init", "tab:blue"), ("lq-lora init", "tab:red"), ("bnb + PEFT", "tab:orange")):
        ax_all.scatter([], [], color=c, label=label)
    ax_all.scatter([], [], facecolors="none", edgecolors="gray", label="before finetuning")
    ax_all.scatter([], [], color="gray", label="after finetuning")
    for ax in (ax_all, ax_zoom):
        ax.set_xlabel("storage bits per parameter of the quantized linears (metadata included)")
    ax_all.set_ylabel(f"perplexity, {results['settings']['eval_tokens']} held-out tokens")
    ax_all.set_title("every row")
    ax_zoom.set_title(f"perplexity {_ZOOM[0]:.0f}-{_ZOOM[1]:.0f}")
    fig.suptitle(f"{results['settings']['model']}: perplexity before -> after "
                 f"{results['settings']['steps']} LoRA steps" + (" (PARTIAL)" if results["partial"] else ""))
    ax_all.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    _save(fig, path, results["lqmod_version"])
    plt.close(fig)


def plot_loss_curves(results: Mapping[str, Any], path: Path) -> None:
    """Training loss per step; left: default initializer and baselines, right: lq-lora."""
    plt = _plt()
    ok = [r for r in results["rows"] if r["status"] == "ok" and r.get("loss")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, which in zip(axes, ("default", "lq-lora"), strict=True):
        for r in ok:
            if r["spec"]["initializer"] != which:
                continue
            style = "--" if r["spec"]["kind"] in ("bnb", "fp-lora") else "-"
            ax.plot(range(1, len(r["loss"]) + 1), r["loss"], style, lw=1.2, label=r["row"])
        ax.set_title(f"{which} initializer" + (" (+ baselines)" if which == "default" else ""), fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("training loss (nats/token)")
    fig.suptitle(f"{results['settings']['model']}: LoRA finetuning loss" + (" (PARTIAL)" if results["partial"] else ""))
    fig.tight_layout()
    _save(fig, path, results["lqmod_version"])
    plt.close(fig)


def write_outputs(results: Mapping[str, Any], out: str | os.PathLike[str], *, plots: bool = True) -> dict[str, Path]:
    """``finetune_lm.json``, ``finetune_lm.md`` and (with matplotlib) the two plots under ``out``."""
    out = Path(out)
    paths = {"json": out / "finetune_lm.json", "md": out / "finetune_lm.md"}
    _atomic_write(paths["json"], _dump(results))
    _atomic_write(paths["md"], markdown(results))
    if plots:
        try:
            _plt()
        except ImportError:
            return paths
        paths["ppl_vs_bits"] = out / "ppl_vs_bits.png"
        paths["loss_curves"] = out / "loss_curves.png"
        plot_ppl_vs_bits(results, paths["ppl_vs_bits"])
        plot_loss_curves(results, paths["loss_curves"])
    return paths
