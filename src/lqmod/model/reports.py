"""What quantizing a model reports, per layer and in total, and the bytes a model occupies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, int]
    quantizer: str
    config: dict[str, Any]
    bits_per_param: float
    rel_error: float


@dataclass
class QuantizeReport:
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    @property
    def bits_per_param(self) -> float:
        total = sum(r.bits_per_param * r.shape[0] * r.shape[1] for r in self.layers)
        return total / max(self.n_params, 1)


def size_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer: what the model occupies."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
