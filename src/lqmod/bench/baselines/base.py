"""The interface every baseline implements, and small helpers they share."""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = ["Baseline", "BaselineError", "Quantized", "Unavailable", "nbits", "require"]


class Unavailable(RuntimeError):
    """The baseline cannot run in this environment; ``str()`` says why."""


class BaselineError(ValueError):
    """A baseline spec names an unknown baseline or field."""


@dataclass(frozen=True)
class Quantized:
    weight: torch.Tensor  # dequantized (out, in), float32
    storage_bits: int
    note: str = ""


def nbits(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() * 8 for t in tensors)


def _version(dist: str) -> str:
    try:
        return f"{dist} {md.version(dist)}"
    except md.PackageNotFoundError:
        return dist


def require(module: str, dist: str, hint: str = "") -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise Unavailable(f"{dist} not installed ({exc.__class__.__name__}: {exc}){hint}") from None


@dataclass(frozen=True)
class Baseline:
    """A baseline's settings are its dataclass fields; ``name``/``dist`` identify it."""

    name: ClassVar[str]
    dist: ClassVar[str]
    needs_hessian: ClassVar[bool] = False

    @property
    def source(self) -> str:
        return _version(self.dist)

    def prepare(self) -> None:
        """Import the package (raise :class:`Unavailable` if it cannot run here)."""

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        raise NotImplementedError
