"""Side-by-side benchmark of lqmod quantizers and third-party baselines on real weights.

Every row of the benchmark turns each targeted dense ``(out, in)`` weight into a dequantized
weight plus its storage cost (see :mod:`lqmod.bench.methods`), so the same metrics
(:mod:`lqmod.bench.metrics`) apply to lqmod quantizers and to bitsandbytes, HQQ, PEFT's
LoftQ, torchao and GPTQModel alike. ``lqmod bench`` (:mod:`lqmod.bench.command`) runs it.

Importing this package is cheap: baselines import their packages only when they run.
"""

from __future__ import annotations

from lqmod.bench.matrix import RowSpec, default_rows, parse_specs

__all__ = ["RowSpec", "default_rows", "parse_specs"]
