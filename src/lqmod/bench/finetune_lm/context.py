"""The shared inputs of every row, loaded once per process and only when a row runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lqmod.bench.finetune_lm.settings import LMBenchSettings


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
