"""The adapters bench's two objectives: a loaded model with its training budget, metric and statistics."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lqmod.bench.adapters_settings import AdapterBenchSettings
from lqmod.bench.matrix import SpecError
from lqmod.types import LayerStats


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
