"""How the first tokens of each calibration sequence (attention sinks) weigh in ``X^T X``.

A causal LM turns the first token of a window into an *attention sink*: later tokens put much
of their attention on it, so an error in its keys and values reaches every position. Its share
of ``X^T X`` says nothing about that: after the RMSNorm feeding q/k/v it is 0.02-0.5% of the
trace on SmolLM2-135M, and OPTQ's error feedback, which moves rounding error to directions
the Hessian calls cheap, pushes error onto the sink (83-99% relative error at q/v, NF3 28-47%).
Re-weighting the sink part of each layer's Hessian to a fixed share of its trace,
``H = H_rest + c H_first`` with ``tr(c H_first) = share * tr(H)``, is what makes OPTQ-3 beat
NF3 there (``plugins/lqmod_optq/README.md`` has the measurements). ``share=0`` leaves the sink
tokens out entirely (the experiment that showed the effect from the other side).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CAUSAL_LM_SINK_SHARE", "SinkWeighting", "parse_sink_share", "resolve_auto", "reweight"]

# What ``auto`` (the CLI default) means for a causal LM: the share measured to make OPTQ-3 beat NF3.
CAUSAL_LM_SINK_SHARE = 0.5


class SinkWeighting(BaseModel):
    """The first ``tokens`` real tokens of every sequence carry ``share`` of each layer's ``tr(X^T X)``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens: int = Field(default=1, ge=1, description="real tokens at the start of each sequence treated as sinks")
    share: float = Field(ge=0.0, lt=1.0, description="their share of tr(X^T X) after re-weighting; 0 leaves them out")

    @property
    def drops(self) -> bool:
        """True when the sink tokens are left out (share 0): they then count neither as tokens nor in |x|."""
        return self.share == 0.0

    def cache_extra(self) -> dict[str, Any]:
        """Keyword arguments naming this weighting in a statistics cache key."""
        if self.drops:
            return {"skip_first": self.tokens}  # the key earlier versions wrote for this case
        return {"sink": {"tokens": self.tokens, "share": self.share}}


def reweight(rest: torch.Tensor, first: torch.Tensor | None, sink: SinkWeighting) -> torch.Tensor:
    """``rest + c * first`` with ``c`` chosen so that the first tokens carry ``sink.share`` of the trace.

    ``c`` is per layer. When either part has no trace (no sink token seen, or nothing else
    seen) there is nothing to balance and the natural sum is returned, except that a share of
    0 always drops the first tokens.
    """
    if first is None:
        return rest
    if sink.drops:
        return rest
    t_rest, t_first = float(rest.diagonal().sum()), float(first.diagonal().sum())
    if t_rest <= 0.0 or t_first <= 0.0:
        return rest + first
    c = sink.share * t_rest / ((1.0 - sink.share) * t_first)
    return rest + c * first


def parse_sink_share(value: str) -> float | Literal["auto"] | None:
    """argparse type for ``--sink-share``: a float in [0, 1), ``none`` (natural weighting) or ``auto``."""
    v = value.strip().lower()
    if v in {"none", "off", "natural"}:
        return None
    if v == "auto":
        return "auto"
    try:
        share = float(value)
    except ValueError:
        raise ValueError(f"sink share must be a number in [0, 1), 'auto' or 'none', got {value!r}") from None
    if not 0.0 <= share < 1.0:
        raise ValueError(f"sink share must be in [0, 1) (the sink tokens' share of tr(X^T X)), got {share}")
    return share


def resolve_auto(share: float | str | None, model_kind: str | None) -> float | None:
    """``auto``: :data:`CAUSAL_LM_SINK_SHARE` for a causal LM, natural weights for anything else."""
    if share == "auto":
        return CAUSAL_LM_SINK_SHARE if model_kind == "causal-lm" else None
    assert share is None or isinstance(share, float)
    return share
