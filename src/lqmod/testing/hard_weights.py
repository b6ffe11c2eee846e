"""The hard test weights of the quantizer contract, beside the Gaussian one."""

from __future__ import annotations

import functools

import torch

WEIGHT_KINDS = ("outliers", "heavy-tailed", "real")
#: The MiniLM matrix the "real" weight is cut from (384 x 1536: fits most test shapes).
REAL_WEIGHT = "encoder.layer.0.output.dense.weight"


@functools.lru_cache(maxsize=4)
def _real_matrix(name: str) -> torch.Tensor | None:
    """A trained weight matrix of all-MiniLM-L6-v2 (via :mod:`lqmod.hf`), or None if absent."""
    try:
        from safetensors import safe_open

        from lqmod.hf import resolve_model

        path = resolve_model("minilm").path / "model.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor(name).float() if name in fh.keys() else None  # noqa: SIM118
    except (ImportError, FileNotFoundError, OSError):
        return None
