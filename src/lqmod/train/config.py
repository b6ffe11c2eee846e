"""The causal-LM finetuning configuration (pydantic, frozen, typo-proof)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lqmod.config import FrozenModel

__all__ = ["FinetuneConfig"]


class FinetuneConfig(FrozenModel):
    """What one run of :func:`lqmod.train.train_causal_lm` does.

    The batch of one optimizer step is ``micro_batch_size * grad_accum`` windows of
    ``seq_len`` tokens; the loss is the mean over every scored token of that whole batch,
    so ``k`` micro-batches give the update of one batch ``k`` times larger. Under
    ``torchrun`` with ``N`` processes that batch stays the *global* one: each process runs
    ``1/N`` of it in micro-batches of ``micro_batch_size`` (see :mod:`lqmod.train.distributed`).
    """

    steps: int = Field(40, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(8, ge=1, description="windows per forward/backward")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    seq_len: int = Field(128, ge=2, description="tokens per packed window")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0, description="linear warmup steps; default warmup_ratio * steps")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; None disables clipping")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype; auto = bf16 on a CUDA device that supports it, else fp32"
    )
    gradient_checkpointing: bool = False
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after)")
    eval_batch_size: int = Field(8, ge=1)
    save_every: int = Field(0, ge=0, description="save resumable state every N steps (0: only at the end)")
    keep_states: int = Field(2, ge=1, description="resumable states kept on disk (oldest deleted)")
    log_every: int = Field(1, ge=1)
    seed: int = 0
    dist_timeout_s: float = Field(
        600.0, gt=0, description="data-parallel runs: seconds a collective waits for a stalled process before failing"
    )

    @field_validator("lr", "weight_decay")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v}")
        return v

    @model_validator(mode="after")
    def _warmup_fits(self) -> FinetuneConfig:
        if self.warmup_steps is not None and self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} is more than steps={self.steps}")
        return self

    @property
    def batch_windows(self) -> int:
        return self.micro_batch_size * self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.batch_windows * self.seq_len

    @property
    def n_warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else round(self.warmup_ratio * self.steps)
