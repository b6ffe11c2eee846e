"""The adapters bench's settings and their defaults per model kind, and choosing its bases and variants."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from lqmod.bench.matrix import RowSpec, SpecError, format_spec, parse_specs
from lqmod.plugins import get_registry

# Default bases per model kind, as data (rows whose quantizer is not registered are dropped).
_DEFAULT_BASES = {
    "causal-lm": ("nf:bits=3,blocksize=64,double_quant=true",),
    "encoder": (
        "nf:bits=4,blocksize=64,double_quant=true",
        "nf:bits=3,blocksize=64,double_quant=true",
        "optq:bits=3,group_size=64",
    ),
}
# (steps, sequences per step, lr) per model kind: a causal-LM step costs ~10x an encoder step on CPU.
_DEFAULT_BUDGET = {"causal-lm": (8, 4, 1e-3), "encoder": (40, 16, 1e-3)}


@dataclass
class AdapterBenchSettings:
    model: str = "minilm"
    bases: str | None = None  # quantizer specs joined by ';' (None: the defaults for the model kind)
    adapters: str | None = None  # variant names joined by ',' (None: every registered variant)
    steps: int | None = None
    batch: int | None = None  # sequences per step
    lr: float | None = None
    rank: int = 8
    seed: int = 0
    n_calib: int | None = None  # calibration sentences (encoder, 256) / windows (causal LM, 16), if a base needs them
    n_eval: int | None = None  # encoder: held-out sentences
    seq_len: int = 128  # causal LM: tokens per training window
    eval_tokens: int = 4096  # causal LM: perplexity tokens
    eval_context: int = 256
    layer_timing: bool = True
    out: Path = Path("benchmarks/results")
    name: str | None = None  # output stem (default: adapters_<model>)
    progress: bool = True

    def resolved(self, kind: str) -> AdapterBenchSettings:
        steps, batch, lr = _DEFAULT_BUDGET["causal-lm" if kind == "causal-lm" else "encoder"]
        return replace(
            self,
            steps=steps if self.steps is None else self.steps,
            batch=self.batch or batch,
            lr=lr if self.lr is None else self.lr,
            n_calib=self.n_calib or (16 if kind == "causal-lm" else 256),
            n_eval=self.n_eval or 1000,
        )


def default_bases(kind: str, registered: set[str]) -> list[RowSpec]:
    specs = _DEFAULT_BASES["causal-lm" if kind == "causal-lm" else "encoder"]
    return [r for r in parse_specs(";".join(specs), "lqmod") if r.name in registered]


def select_bases(text: str | None, kind: str) -> list[RowSpec]:
    """The base rows: parsed and checked against the registry (a one-line error naming the known ones)."""
    quantizers = get_registry().quantizers()
    rows = default_bases(kind, set(quantizers)) if text is None else parse_specs(text, "lqmod")
    for r in rows:
        if r.name not in quantizers:
            raise SpecError(f"base {r.name!r} is not a registered quantizer; registered: {sorted(quantizers)}")
        if r.lora or r.init:
            raise SpecError(f"base {format_spec(r)!r}: lora./init. keys do not apply here (use --rank)")
    if not rows:
        raise SpecError("no base quantizer to run: give --bases, e.g. 'nf:bits=4,blocksize=64'")
    return rows


def select_variants(text: str | None) -> list[str]:
    """Adapter variant names (when ``text`` is None: every registered one, the configuration's default
    variant first as the reference); unknown ones are a one-line error."""
    from lqmod.config import LoRAConfig

    default = LoRAConfig(r=1, alpha=1.0).adapter
    known = sorted(get_registry().adapters(), key=lambda n: n != default)
    if text is None:
        return known
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SpecError(f"--adapters {text!r}: unknown variant(s) {unknown}; registered: {known}")
    if len(set(names)) != len(names):
        raise SpecError(f"--adapters {text!r} names a variant twice")
    return names
