"""Which rows the benchmark runs: (quantizer x config) specs, parsed from short strings.

A spec is ``name`` or ``name:key=value,key=value``; several are joined with ``;``, e.g.
``"nf:bits=4,blocksize=64;rtn:bits=4"``. Values are read as bool (``true``/``false``), int,
float, ``none``, or else left as strings. For lqmod rows, keys ``lora.<field>`` go to the
:class:`~lqmod.config.LoRAConfig` (e.g. ``lora.initializer=loftq,lora.r=16``) and keys
``init.<field>`` to the initializer's config; all other keys are the quantizer's config,
validated by its plug-in when the row runs (so an unknown field is a row error, not a crash).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "BASELINE_NAMES",
    "RowSpec",
    "SpecError",
    "default_baselines",
    "default_rows",
    "format_spec",
    "parse_spec",
    "parse_specs",
    "parse_value",
]

Kind = Literal["lqmod", "baseline"]

# Names the baseline factory knows (lqmod.bench.baselines); listed here so the parser can
# tell a baseline from an lqmod quantizer without importing any third-party package.
BASELINE_NAMES = ("bnb-nf4", "bnb-fp4", "hqq", "loftq", "torchao-nf4", "gptq")


class SpecError(ValueError):
    """A spec string is malformed; the message quotes it and shows the expected form."""


@dataclass(frozen=True)
class RowSpec:
    """One benchmark row: a registered lqmod quantizer or a baseline, with its settings."""

    kind: Kind
    name: str
    config: Mapping[str, Any] = field(default_factory=dict)
    lora: Mapping[str, Any] = field(default_factory=dict)
    init: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return format_spec(self)


def parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_spec(text: str, kind: Kind | None = None) -> RowSpec:
    """One ``name:key=value,...`` spec. ``kind`` defaults to baseline for known baseline names."""
    text = text.strip()
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name or any(c in name for c in "=,"):
        raise SpecError(f"bad spec {text!r}: expected 'name' or 'name:key=value,key=value'")
    config: dict[str, Any] = {}
    lora: dict[str, Any] = {}
    init: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise SpecError(f"bad item {item!r} in spec {text!r}: expected key=value")
        target, key = (
            (lora, key[5:])
            if key.startswith("lora.")
            else (init, key[5:])
            if key.startswith("init.")
            else (config, key)
        )
        # A dotted key fills a nested config (a wrapper's base: "icq:base=nf,base_config.bits=3").
        *parents, leaf = key.split(".")
        for part in parents:
            if not part:
                raise SpecError(f"bad key {key!r} in spec {text!r}: empty part in a dotted key")
            inner = target.setdefault(part, {})
            if not isinstance(inner, dict):
                raise SpecError(f"key {part!r} in spec {text!r} is both a value and a nested config")
            target = inner
        if not leaf:
            raise SpecError(f"bad key {key!r} in spec {text!r}: empty part in a dotted key")
        if leaf in target:
            raise SpecError(f"key {key!r} given twice in spec {text!r}")
        target[leaf] = parse_value(value)
    if kind is None:
        kind = "baseline" if name in BASELINE_NAMES else "lqmod"
    if kind == "baseline" and (lora or init):
        raise SpecError(f"spec {text!r}: lora./init. keys apply to lqmod quantizers only")
    return RowSpec(kind, name, config, lora, init)


def parse_specs(text: str | None, kind: Kind | None = None) -> list[RowSpec]:
    """Specs separated by ``;`` (empty parts ignored)."""
    if not text:
        return []
    return [parse_spec(part, kind) for part in text.split(";") if part.strip()]


def _fmt(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def format_spec(row: RowSpec) -> str:
    """The inverse of :func:`parse_spec` (``parse_spec(format_spec(r)) == r``)."""
    items = _items(row.config, "") + _items(row.lora, "lora.") + _items(row.init, "init.")
    return row.name + (":" + ",".join(items) if items else "")


def _items(config: Mapping[str, Any], prefix: str) -> list[str]:
    out: list[str] = []
    for k, v in config.items():
        out += _items(v, f"{prefix}{k}.") if isinstance(v, Mapping) else [f"{prefix}{k}={_fmt(v)}"]
    return out


# -- default matrices ------------------------------------------------------------------------

_NF_FULL = (
    "nf:bits=4,blocksize=64,double_quant=false",
    "nf:bits=4,blocksize=64,double_quant=true",
    "nf:bits=4,blocksize=128,double_quant=true",
    "nf:bits=3,blocksize=64,double_quant=false",
    "nf:bits=2,blocksize=64,double_quant=false",
)
# SmolLM2's GGUF weights already sit on a 4-bit grid with blocks of 32, so 4-bit rows there
# use blocks of 64 and more, and the interesting comparisons are at 3 and 2 bits.
# (Blocks of 128 do not fit its 576-wide rows either.)
_NF_CAUSAL = (
    "nf:bits=4,blocksize=64,double_quant=false",
    "nf:bits=4,blocksize=64,double_quant=true",
    "nf:bits=3,blocksize=64,double_quant=false",
    "nf:bits=2,blocksize=64,double_quant=false",
)
_BASELINES_FULL = (
    "bnb-nf4:blocksize=64,double_quant=false",
    "bnb-nf4:blocksize=64,double_quant=true",
    "bnb-fp4:blocksize=64,double_quant=false",
    "torchao-nf4:blocksize=64,scaler_blocksize=256",
    "loftq:bits=4,rank=16,iters=1",
    "hqq:bits=4,group_size=64",
    "hqq:bits=3,group_size=64",
    "hqq:bits=2,group_size=64",
    "gptq:bits=4,group_size=64",
    "gptq:bits=3,group_size=64",
    "gptq:bits=2,group_size=64",
)
# The same baselines on the causal LM, with 4-bit rows at blocks of 64 (see _NF_CAUSAL).
_BASELINES_CAUSAL = (
    "bnb-nf4:blocksize=64,double_quant=false",
    "bnb-nf4:blocksize=64,double_quant=true",
    "torchao-nf4:blocksize=64,scaler_blocksize=256",
    "loftq:bits=4,rank=16,iters=1",
    "hqq:bits=4,group_size=64",
    "hqq:bits=3,group_size=64",
    "hqq:bits=2,group_size=64",
    "gptq:bits=4,group_size=64",
    "gptq:bits=3,group_size=64",
    "gptq:bits=2,group_size=64",
)
_NF_QUICK = ("nf:bits=4,blocksize=64,double_quant=false", "nf:bits=3,blocksize=64,double_quant=false")
_BASELINES_QUICK = ("bnb-nf4:blocksize=64,double_quant=false", "torchao-nf4:blocksize=64,scaler_blocksize=256")


def _other_quantizer_rows(
    names: Iterable[str], fields_of: Mapping[str, Iterable[str]], bits: Iterable[int]
) -> list[str]:
    """Rows for registered quantizers the defaults do not name (e.g. a third party's ``rtn``).

    Only field names are assumed: ``bits`` is swept, a ``blocksize`` or ``group_size`` field
    is set to 64 so block sizes match the NF rows. Configs the plug-in rejects become error
    rows when they run.
    """
    rows = []
    for name in sorted(names):
        fields = set(fields_of.get(name, ()))
        block = next((f"{f}=64" for f in ("blocksize", "group_size") if f in fields), None)
        for b in bits if "bits" in fields else (None,):
            items = [f"bits={b}"] if b is not None else []
            items += [block] if block else []
            rows.append(name + (":" + ",".join(items) if items else ""))
    return rows


def default_rows(
    model_kind: str, quantizer_fields: Mapping[str, Iterable[str]], *, quick: bool = False
) -> list[RowSpec]:
    """The lqmod rows for a model kind ("encoder" or "causal-lm").

    ``quantizer_fields`` maps every registered quantizer name to its config field names; the
    NF rows are fixed, every other registered quantizer gets a bits sweep.
    """
    nf: tuple[str, ...]
    bits: tuple[int, ...]
    if quick:
        nf, bits = _NF_QUICK, (4,)
    elif model_kind == "causal-lm":
        nf, bits = _NF_CAUSAL, (4, 3, 2)
    else:
        nf, bits = _NF_FULL, (4, 3, 2)
    specs = [s for s in nf if "nf" in quantizer_fields]
    specs += _other_quantizer_rows([n for n in quantizer_fields if n != "nf"], quantizer_fields, bits)
    return [parse_spec(s, "lqmod") for s in specs]


def default_baselines(model_kind: str, *, quick: bool = False) -> list[RowSpec]:
    specs: tuple[str, ...]
    if quick:
        specs = _BASELINES_QUICK
    elif model_kind == "causal-lm":
        specs = _BASELINES_CAUSAL
    else:
        specs = _BASELINES_FULL
    return [parse_spec(s, "baseline") for s in specs]
