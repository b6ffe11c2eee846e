"""Matmul-with-materialization backends.

A backend computes ``x @ W.T`` (forward) and ``g @ W`` (backward) for a quantized ``W``
without keeping the dense ``W`` alive afterwards. The plain-torch :mod:`reference` backend
works for every quantizer on every device; faster backends (Triton) declare which formats
and devices they support and are imported lazily, so ``import lqmod`` never imports triton.
"""

from __future__ import annotations

from lqmod.kernels.base import Capabilities, KernelBackend, select_backend
from lqmod.kernels.formats import LutFormat

__all__ = ["Capabilities", "KernelBackend", "LutFormat", "select_backend"]
