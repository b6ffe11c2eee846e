"""The benchmark's rows (:data:`ROWS`), the ones a plain run computes (:data:`DEFAULT_ROWS`)
and choosing rows by name or pattern."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

RowKind = Literal["quantizer", "plan", "bnb", "fp-lora"]
Calibration = Literal["none", "hessian", "sequential"]


@dataclass(frozen=True)
class LMRow:
    """One row: how the trainable model is built."""

    name: str
    kind: RowKind
    quantizer: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    initializer: str = "default"
    calibration: Calibration = "none"
    budget: float | None = None  # plan rows: average bits per parameter
    plan_error: str | None = None  # plan rows: the table's error measure (None: the settings')
    # lq-lora rows: a cap below the settings' lq_iters (QuIP#-like: each alternation re-runs it)
    lq_iters: int | None = None
    description: str = ""

    def spec(self) -> dict[str, Any]:
        spec = {
            "name": self.name, "kind": self.kind, "quantizer": self.quantizer, "config": dict(self.config),
            "initializer": self.initializer, "calibration": self.calibration, "budget": self.budget,
        }  # fmt: skip
        if self.plan_error is not None:  # absent otherwise, so earlier rows keep their fingerprints
            spec["plan_error"] = self.plan_error
        if self.lq_iters is not None:  # the same: absent unless a row caps it
            spec["lq_iters"] = self.lq_iters
        return spec


NF = {"blocksize": 64, "double_quant": True}


def _rows() -> list[LMRow]:
    rows: list[LMRow] = []
    for init in ("default", "lq-lora"):
        suffix = "" if init == "default" else "+lq-lora"
        for b in (4, 3, 2):
            rows.append(LMRow(f"nf{b}{suffix}", "quantizer", "nf", {"bits": b, **NF}, init,
                              description=f"NF{b}, blocks of 64, double-quantized scales"))
        for b in (3, 2):
            rows.append(LMRow(f"optq{b}{suffix}", "quantizer", "optq", {"bits": b, "sym": False}, init,
                              "sequential", description=f"OPTQ {b}-bit asymmetric, sequential calibration"))
        # OPTQ-3 at NF3's bits: byte scales (scale_bits=8) over groups of 96, 3.115 bits/param
        # against NF3's 3.127 (the optq3 row pays 3.297 for float16 scales over groups of 64).
        rows.append(LMRow(f"optq3-g96-s8{suffix}", "quantizer", "optq",
                          {"bits": 3, "sym": False, "group_size": 96, "scale_bits": 8}, init, "sequential",
                          description="OPTQ 3-bit asymmetric, groups of 96, byte scales, sequential calibration"))
        for b in (3, 2):
            # lq-lora over QuIP#-like: 2 alternations (each is a QuIP run of every layer, ~7 min
            # on 2 idle cores; 10 would take over an hour per row), as in `lqmod bench init`.
            rows.append(LMRow(f"quip{b}{suffix}", "quantizer", "quip", {"bits": b}, init, "hessian",
                              lq_iters=2 if init == "lq-lora" else None,
                              description=f"QuIP#-like {b}-bit, Hessians of the fp model"))
        for budget in (3.25, 2.75):
            rows.append(LMRow(f"plan{budget}{suffix}", "plan", None, {}, init, "hessian", budget,
                              description=f"ILP plan at {budget} bits/param over NF and OPTQ options"))
    rows = [r if r.initializer == "default" else replace(r, description=r.description + "; lq-lora init")
            for r in rows]
    # The best OPTQ-3 setting of the sink study at NF3's bits: byte scales over groups of 96 with
    # act-order (static groups: no g_idx stored, still 3.115 bits) and damping 0.1.
    rows.append(LMRow("optq3-g96-s8-act", "quantizer", "optq",
                      {"bits": 3, "sym": False, "group_size": 96, "scale_bits": 8, "desc_act": True,
                       "static_groups": True, "damp": 0.1}, "default", "sequential",
                      description="OPTQ 3-bit asymmetric, groups of 96, byte scales, act-order (static groups), "
                      "damping 0.1, sequential calibration"))
    # Part 2 of issue 11: the same plans from a weight-space table (one quantization per option
    # serves both measures, so these cost only their training).
    for budget in (3.25, 2.75):
        rows.append(LMRow(f"plan{budget}-frob", "plan", None, {}, "default", "hessian", budget, "frobenius",
                          description=f"ILP plan at {budget} bits/param, weight-space (Frobenius) error table"))
    # ...and from the K-FAC table: each layer's output error weighed by the loss's squared
    # output gradient, so layers compare by what they cost the loss (their table needs a Fisher pass).
    for budget in (3.25, 2.75):
        rows.append(LMRow(f"plan{budget}-kfac", "plan", None, {}, "default", "hessian", budget, "kfac",
                          description=f"ILP plan at {budget} bits/param, K-FAC (Fisher-weighted output) error table"))
    rows.append(LMRow("bnb-nf4", "bnb", None, {"bits": 4, **NF},
                      description="bitsandbytes Linear4bit NF4 (blocks of 64, double quant) + PEFT LoRA (QLoRA)"))
    rows.append(LMRow("fp-lora", "fp-lora", description="PEFT LoRA on the dense fp32 model"))
    # Sort: the cheap rows first, so a run cut short has the most rows.
    order = {"nf": 0, "fp-lora": 1, "bnb": 2, "quip": 3, "optq": 4, "plan": 5}
    return sorted(rows, key=lambda r: (order.get(r.quantizer or r.kind, 9), r.initializer != "default"))


ROWS: list[LMRow] = _rows()
# The rows a plain run computes: about an hour on an idle 2-core CPU at the FULL settings with
# --eval-tokens 4096 (measured 2026-12-01, torch 2 threads, row by row: ~1 min of training and
# evaluation per row; quantizing NF 0.5-1.2 min, lq-lora over NF ~0.7 min, sequential OPTQ 2.5
# min, QuIP#-like 7 min, the plans' error table 4.6 min shared by all four plan rows). The rows
# left out are the lq-lora rows over OPTQ, QuIP and the plans: lq-lora re-runs the Hessian-aware
# quantizer every alternation, so each takes 11-30 min (measured 2026-12-01 beside other work,
# load 3-6: optq2 16 min, optq3 30, plan3.25 20, plan2.75 11, quip3 at 2 alternations 22);
# select them by name, with '*+lq-lora', or with --rows all.
DEFAULT_ROWS = ("fp-lora", "bnb-nf4", "nf4", "nf3", "nf2", "nf4+lq-lora", "nf3+lq-lora", "nf2+lq-lora", "quip3",
                "quip2", "optq3", "optq2", "optq3-g96-s8", "optq3-g96-s8-act", "plan3.25", "plan2.75", "plan3.25-frob",
                "plan2.75-frob", "plan3.25-kfac", "plan2.75-kfac")  # fmt: skip


def select_rows(patterns: str | Sequence[str] | None, rows: Sequence[LMRow] = ROWS) -> list[LMRow]:
    """Rows whose name matches one of the comma-separated names or shell patterns (``nf*``);
    None: :data:`DEFAULT_ROWS`; ``"all"``: every row."""
    if patterns is None:
        return [r for r in rows if r.name in DEFAULT_ROWS]
    if patterns == "all":
        return list(rows)
    pats = [p.strip() for p in (patterns.split(",") if isinstance(patterns, str) else patterns) if p.strip()]
    if not pats:
        raise ValueError("--rows is empty; give row names or patterns, e.g. nf3,nf3+lq-lora,fp-lora or 'nf*'")
    for p in pats:
        if not any(fnmatch.fnmatchcase(r.name, p) for r in rows):
            raise ValueError(f"row {p!r} matches no row; rows: {', '.join(r.name for r in rows)}")
    return [r for r in rows if any(fnmatch.fnmatchcase(r.name, p) for p in pats)]
