"""Shared test data for the optq tests: correlated calibration inputs and their Hessian."""

from __future__ import annotations

import torch

from lqmod.types import LayerStats


def calibration_inputs(
    in_features: int, n_tokens: int = 2048, seed: int = 0, dead: tuple[int, ...] = (), spread: float = 0.7
) -> torch.Tensor:
    """Inputs with correlated features whose scales spread by ``exp(spread * N(0, 1))``.

    Correlation and unequal scales are what make OPTQ differ from round-to-nearest.
    """
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=gen, dtype=torch.float64) / in_features**0.5
    mix += torch.eye(in_features, dtype=torch.float64)
    scale = torch.exp(torch.randn(in_features, generator=gen, dtype=torch.float64) * spread)
    x = (torch.randn(n_tokens, in_features, generator=gen, dtype=torch.float64) @ mix) * scale
    if dead:
        x[:, list(dead)] = 0.0
    return x


def hessian_stats(x: torch.Tensor) -> LayerStats:
    return LayerStats(hessian=x.T @ x, n_tokens=x.shape[0])


def objective(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """The GPTQ proxy loss tr((W - Q) H (W - Q)^T), in float64."""
    d = w.double() - q.double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))
