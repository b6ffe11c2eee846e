"""Baselines, each from its own package, behind one interface.

Every baseline maps a dense ``(out, in)`` weight (and, for GPTQ, the calibration Gram
``X^T X``) to :class:`Quantized`: the dequantized weight and the bits its package stores, so
the metrics apply identically to every row. Packages are imported in ``prepare()``, which
raises :class:`Unavailable` with the reason (not installed, unsupported here) so the row is
reported rather than dropped. Constant code tables (the 16 NF4 values, the 256-entry dynamic
map) are not counted as storage, for lqmod rows neither.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lqmod.bench.baselines.base import Baseline, BaselineError, Quantized, Unavailable
from lqmod.bench.baselines.bnb import BnbFP4, BnbNF4
from lqmod.bench.baselines.gptq import GPTQ
from lqmod.bench.baselines.hqq import HQQ
from lqmod.bench.baselines.loftq import LoftQ
from lqmod.bench.baselines.torchao import TorchaoNF4

__all__ = [
    "BASELINES",
    "GPTQ",
    "HQQ",
    "Baseline",
    "BaselineError",
    "BnbFP4",
    "BnbNF4",
    "LoftQ",
    "Quantized",
    "TorchaoNF4",
    "Unavailable",
    "make_baseline",
]

BASELINES: dict[str, type[Baseline]] = {cls.name: cls for cls in (BnbNF4, BnbFP4, TorchaoNF4, HQQ, LoftQ, GPTQ)}


def make_baseline(name: str, config: dict[str, Any]) -> Baseline:
    """The baseline ``name`` with ``config``; unknown names or fields list what is accepted."""
    if name not in BASELINES:
        raise BaselineError(f"unknown baseline {name!r}. Choose one of: {', '.join(BASELINES)}")
    cls = BASELINES[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise BaselineError(f"baseline {name!r} has no field(s) {unknown}; fields: {', '.join(fields) or '(none)'}")
    return cls(**config)
