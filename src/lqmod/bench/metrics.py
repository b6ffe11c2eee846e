"""The numbers in the table, as small pure functions (hand-checkable in tests).

* bits per parameter, metadata included: storage bits / numel (for lqmod rows this equals
  :meth:`lqmod.QuantizedWeight.bits_per_param`);
* weight error: ``||W_q - W||_F / ||W||_F``;
* layer output error on calibration activations ``X`` (tokens x in):
  ``||X W_q^T - X W^T||_F / ||X W^T||_F``. Computed from the Gram matrix ``H = X^T X``
  because ``||X D^T||_F^2 = tr(D H D^T)``: identical, and ``H`` (in x in) is far smaller
  than ``X`` for thousands of tokens, so it can be kept for every layer at once;
* end-model fidelity: cosine similarity of sentence embeddings, and perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "aggregate_layers",
    "bits_per_param",
    "cosine_rows",
    "gram",
    "output_rel_error",
    "output_rel_error_gram",
    "perplexity_from_nll",
    "weight_rel_error",
]


def bits_per_param(storage_bits: int, numel: int) -> float:
    if numel <= 0:
        raise ValueError(f"numel must be positive, got {numel}")
    return storage_bits / numel


def weight_rel_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    w = weight.double()
    return float((approx.double() - w).norm() / w.norm().clamp(min=1e-300))


def output_rel_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||x approx^T - x weight^T||_F / ||x weight^T||_F`` straight from activations."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    ref = x2 @ weight.double().T
    return float((x2 @ approx.double().T - ref).norm() / ref.norm().clamp(min=1e-300))


def gram(x: torch.Tensor) -> torch.Tensor:
    """``X^T X`` in float64 for activations of any leading shape (..., in)."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    return x2.T @ x2


def _quad(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    # tr(D H D^T) = sum((D H) * D); float64 because the difference D is small relative to W.
    return ((d @ h) * d).sum()


def output_rel_error_gram(h: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    """The same as :func:`output_rel_error` with ``h = X^T X`` in place of ``X``."""
    h = h.double()
    w = weight.double()
    num = _quad(approx.double() - w, h).clamp(min=0)
    den = _quad(w, h).clamp(min=1e-300)
    return math.sqrt(float(num / den))


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows of two (n, d) matrices."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def perplexity_from_nll(total_nll: float, n_tokens: int) -> float:
    return math.exp(total_nll / max(n_tokens, 1))


def aggregate_layers(layers: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Model-level summary of per-layer rows holding numel, storage_bits, w_err, out_err.

    Bits per parameter are exact totals (storage over numel); errors are plain means over
    layers (each layer counts once, as its own operator, whatever its size) plus the worst
    layer's output error, which is what sinks end-model quality.
    """
    if not layers:
        return {}
    numel = sum(int(r["numel"]) for r in layers)
    out: dict[str, float] = {
        "n_layers": float(len(layers)),
        "numel": float(numel),
        "bits_per_param": sum(float(r["storage_bits"]) for r in layers) / numel,
        "w_err": sum(float(r["w_err"]) for r in layers) / len(layers),
    }
    outs = [float(r["out_err"]) for r in layers if r.get("out_err") is not None]
    if outs:
        out["out_err"] = sum(outs) / len(outs)
        out["out_err_max"] = max(outs)
    return out
