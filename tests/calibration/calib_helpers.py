"""Helpers shared by the calibration tests: padded batches, raw-input capture for references."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

import lqmod
from lqmod.config import QuantizerConfig
from lqmod.types import LayerStats, QuantizedWeight, QuantizerSpec


def padded_batch(seed: int = 0, vocab: int = 101) -> dict[str, torch.Tensor]:
    """Three sequences of 12, 9 and 5 real tokens, right-padded with id 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


@contextmanager
def captured_inputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Every input each named module receives, cloned, in call order."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for n in names:
        handles.append(
            model.get_submodule(n).register_forward_hook(
                lambda _m, args, _o, _n=n: seen[_n].append(args[0].detach().clone())
            )
        )
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def reference_gram(
    model: nn.Module, names: Sequence[str], batches: Sequence[Mapping[str, Any]]
) -> dict[str, tuple[torch.Tensor, int, torch.Tensor]]:
    """float64 (X^T X, n_tokens, mean |x|) over real tokens, from the raw captured inputs."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with captured_inputs(model, names) as seen, torch.no_grad():
        for b in batches:
            for n in names:
                seen[n].clear()
            model(**b)
            mask = b.get("attention_mask")
            for n in names:
                (x,) = seen[n]
                rows[n].append(x[mask.bool()] if mask is not None else x.reshape(-1, x.shape[-1]))
    out = {}
    for n in names:
        r = torch.cat(rows[n]).double()
        out[n] = (r.T @ r, r.shape[0], r.abs().mean(0))
    return out


def split_reference(
    model: nn.Module, names: Sequence[str], batches: Sequence[Mapping[str, Any]], k: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """float64 (Gram of the first k real tokens, Gram of the others, real tokens) from raw inputs."""
    first: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    rest: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with captured_inputs(model, names) as seen, torch.no_grad():
        for b in batches:
            for n in names:
                seen[n].clear()
            model(**b)
            mask = b.get("attention_mask", torch.ones(b["input_ids"].shape, dtype=torch.long)).bool()
            for n in names:
                (x,) = seen[n]
                for i in range(x.shape[0]):
                    real = x[i][mask[i]].double()
                    first[n].append(real[:k])
                    rest[n].append(real[k:])
    out = {}
    for n in names:
        f, r = torch.cat(first[n]), torch.cat(rest[n])
        out[n] = (f.T @ f, r.T @ r, f.shape[0] + r.shape[0])
    return out


def left_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    lengths = batch["attention_mask"].sum(1)
    ids = torch.zeros_like(batch["input_ids"])
    mask = torch.zeros_like(batch["attention_mask"])
    width = ids.shape[1]
    for i, n in enumerate(lengths.tolist()):
        ids[i, width - n :] = batch["input_ids"][i, :n]
        mask[i, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


class StepConfig(QuantizerConfig):
    step: float = 0.05


class Recorder:
    """A Hessian-needing toy quantizer (rounding to a coarse grid) that records what it was given."""

    def __init__(self, name: str = "rec", needs: frozenset[str] = frozenset({"hessian"})) -> None:
        self.name, self.needs = name, needs
        self.calls: list[tuple[torch.Tensor, LayerStats | None]] = []

    def quantize(self, w: torch.Tensor, cfg: StepConfig, stats: LayerStats | None) -> QuantizedWeight:
        self.calls.append((w.clone(), stats))
        q = torch.round(w.float() / cfg.step) * cfg.step
        rows, cols = w.shape
        return QuantizedWeight(self.name, cfg.model_dump(), (rows, cols), {"w": q})

    @lqmod.hookimpl
    def lqmod_quantizers(self) -> Iterator[QuantizerSpec]:
        yield QuantizerSpec(
            self.name,
            StepConfig,
            self.quantize,
            lambda qw, dtype: qw.tensors["w"].to(dtype),
            lambda cfg, shape: 32.0,
            needs=self.needs,
        )

    def stats_by_name(self, originals: dict[str, torch.Tensor]) -> dict[str, LayerStats | None]:
        out = {}
        for w, stats in self.calls:
            (name,) = [n for n, o in originals.items() if o.shape == w.shape and torch.equal(o, w)]
            out[name] = stats
        return out
