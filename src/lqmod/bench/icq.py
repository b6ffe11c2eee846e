"""An entropy-raising wrapper quantizer vs its plain base on a real model (``lqmod bench icq``).

Built for IR-QLoRA's ICQ (the ``icq`` plug-in) and named after it, but generic: the wrapper is
any registered quantizer whose config holds ``base`` and ``base_config`` and whose weights
declare a ``lut_format``; the codes counted are read through ``lut_format`` (for a wrapper: its
base's codes), so nothing here imports a plug-in. Rows, each resumable (its JSON is cached as
soon as it is measured):

* a plain base (e.g. ``nf:bits=3,blocksize=64``), the wrapper over it, and the plain base at
  half the block: a wrapper storing 8 bits per block plus a 32-bit scale per 256 blocks costs
  exactly what halving the block of a double-quantized NF base costs (``equal bits``);
* per layer: mean code entropy per block, weight error, calibrated output error
  ``||(W - W_q) X^T|| / ||W X^T||`` on WikiText-2 *validation* Hessians (encoders also on a
  held-out Hessian of test sentences), exact bits/param; then every layer swapped into the fp32
  model for the end metric: encoder sentence-embedding cosine to fp32, causal-LM perplexity on
  the first ``ppl_tokens`` of WikiText-2 raw test at context ``ctx``;
* for wrapper rows, the claim "every block's codes are either the plain base's or strictly higher
  in entropy" checked on every block of the model (violations counted), and the share of blocks
  it moved.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lqmod.bench.matrix import RowSpec, SpecError, parse_specs
from lqmod.bench.step0 import Row, Workload, WorkloadSettings, dense_weight, end_fidelity, layer_metrics, run_cached
from lqmod.code_stats import block_entropy, lut_block_codes
from lqmod.plugins import get_registry
from lqmod.types import QuantizedWeight, QuantizerSpec

__all__ = ["IcqBenchSettings", "block_codes", "block_entropy", "default_rows", "rows_for_bases", "run_icq_bench",
           "select_rows", "wrapped"]  # fmt: skip

# The ICQ rows were first measured by benchmarks/bench_init.py: the same schema keeps their cache keys.
SCHEMA = "lqmod.bench_init/1"
WRAPPER = "icq"
#: Grid candidates per side of the median: MiniLM's rows used 12; SmolLM2's 4 (210 layers on a
#: loaded 2-core machine). The paper's code uses 51-125.
TAU_N = {"encoder": 12, "causal-lm": 4}


def wrapped(row: Row) -> tuple[str, dict[str, Any]] | None:
    """(base name, base config) of a wrapper row (its config holds ``base_config``), None otherwise."""
    if "base_config" not in row.base_config:
        return None
    return str(row.base_config.get("base", "nf")), dict(row.base_config["base_config"])


def _row(quantizer: str, config: dict[str, Any], label: str) -> Row:
    return Row(quantizer, config, "plain", label=label)


FP_ROW = Row("fp", {}, "none", label="fp")


@dataclass
class IcqBenchSettings:
    model: str = "minilm"
    bases: str | None = None  # quantizer specs joined by ';' (default: the model kind's rows)
    wrapper: str = WRAPPER
    tau_n: int | None = None  # None: TAU_N of the model kind
    rows: str | None = None  # comma-separated label substrings: measure only these rows
    n_calib: int | None = None  # encoder: sentences (256); causal LM: windows of ctx tokens (16)
    n_eval: int = 256  # encoder: held-out sentences (x2: statistics + fidelity)
    ctx: int = 256
    ppl_tokens: int = 2048
    cache: Path = field(default_factory=lambda: Path.home() / ".cache" / "lqmod" / "bench_init")
    out: Path = Path("benchmarks/results")
    name: str | None = None  # output stem (default: icq for minilm, else icq_<model>)
    report_only: bool = False
    progress: bool = True


def _label(name: str, cfg: dict[str, Any]) -> str:
    tag = f"{name}{cfg.get('bits', '')}" + ("s" if cfg.get("symmetric") else "")
    block = cfg.get("blocksize", cfg.get("group_size"))
    return f"{tag} b{block}" if block is not None else tag


def _half_block(cfg: dict[str, Any]) -> dict[str, Any] | None:
    for key in ("blocksize", "group_size"):
        if isinstance(cfg.get(key), int) and cfg[key] >= 32 and cfg[key] % 2 == 0:
            return {**cfg, key: cfg[key] // 2}
    return None


def _pair(base: str, cfg: dict[str, Any], wrapper: str, tau_n: int) -> list[Row]:
    wcfg = {**({} if base == "nf" else {"base": base}), "base_config": cfg, "tau_n": tau_n}
    return [_row(base, cfg, _label(base, cfg)), _row(wrapper, wcfg, f"{wrapper}-{_label(base, cfg)}")]


def rows_for_bases(bases: list[RowSpec], wrapper: str, tau_n: int) -> list[Row]:
    """For every base: plain, the wrapper over it, and plain at half the block (equal bits)."""
    rows = [FP_ROW]
    for b in bases:
        cfg = dict(b.config)
        rows += _pair(b.name, cfg, wrapper, tau_n)
        half = _half_block(cfg)
        if half is not None:
            rows.append(_row(b.name, half, _label(b.name, half)))
    seen: set[str] = set()
    return [r for r in rows if not (r.label in seen or seen.add(r.label))]  # type: ignore[func-returns-value]


def _nf(bits: int, block: int) -> dict[str, Any]:
    return {"bits": bits, "blocksize": block, "double_quant": True}


def default_rows(kind: str, wrapper: str = WRAPPER, tau_n: int | None = None) -> list[Row]:
    """The committed rows. Encoders (MiniLM): NF2-4 at block 64 and NF3/4 at 128 (icq at 128 costs
    NF at 64). Causal LMs (SmolLM2, whose 576-wide rows do not tile into blocks of 128): NF2-4 at
    64 with the equal-bits plain NF at 32, and a symmetric integer grid (rtn, group 64) at 3/4 bits;
    ordered so that the 3/4-bit perplexities come first."""
    t = TAU_N.get(kind, 12) if tau_n is None else tau_n
    rows = [FP_ROW]
    if kind == "causal-lm":
        for bits in (3, 4, 2):
            rows += _pair("nf", _nf(bits, 64), wrapper, t)
        rows += [_row("nf", _nf(bits, 32), _label("nf", _nf(bits, 32))) for bits in (3, 4, 2)]
        for bits in (3, 4):
            rows += _pair("rtn", {"bits": bits, "group_size": 64, "symmetric": True}, wrapper, t)
        return rows
    for bits in (3, 4, 2):
        rows += _pair("nf", _nf(bits, 64), wrapper, t)
        if bits != 2:
            rows += _pair("nf", _nf(bits, 128), wrapper, t)
    return rows


# -- codes and entropy, read through lut_format ----------------------------------------------


def block_codes(spec: QuantizerSpec, qweight: QuantizedWeight) -> tuple[torch.Tensor, int] | None:
    """(n_blocks, group) int64 codes of a LUT-style weight and its bits; None where it has no LUT form."""
    fmt = spec.lut_format(qweight) if spec.lut_format is not None else None
    if fmt is None or fmt.g_idx is not None:
        return None
    return lut_block_codes(fmt), fmt.bits


# -- measuring a row -------------------------------------------------------------------------


def run_row(w: Workload, row: Row, _shared: Any = None, *, progress: bool = True) -> dict[str, Any]:
    """Every layer quantized with the row's quantizer: errors, bits, code entropy, and for a wrapper
    row the claim check against its plain base on every block; then the end metric."""
    from lqmod.bench import fidelity
    from lqmod.quantize import quantize_weight

    registry = get_registry()
    spec = registry.quantizer(row.base)
    inner = wrapped(row)
    base = registry.quantizer(inner[0]) if inner else None
    layers, merged = [], {}
    violations = moved = blocks = 0
    t0 = time.perf_counter()
    for name in tqdm(w.targets, desc=row.label, leave=False, disable=not progress):
        weight = dense_weight(w, name)
        qw = quantize_weight(spec, weight, row.base_config, w.stats[name] if spec.needs else None, name=name)
        dense = spec.materialize(qw, torch.float32)
        rec = layer_metrics(w, name, dense)
        rec["bits_per_param"] = qw.bits_per_param()
        read = block_codes(spec, qw)
        if read is not None:
            codes, bits = read
            h = block_entropy(codes, bits)
            rec.update(entropy=float(h.mean()), max_entropy=float(bits))
            blocks += int(h.numel())
            plain_read = None
            if inner is not None and base is not None:
                plain_read = block_codes(base, quantize_weight(base, weight, inner[1], name=name))
            if plain_read is not None:
                plain_codes = plain_read[0]
                changed = (codes != plain_codes).any(dim=1)
                # The claim, on every block: the plain base's codes, or strictly more entropy.
                violations += int((h[changed] <= block_entropy(plain_codes, bits)[changed]).sum())
                moved += int(changed.sum())
        layers.append(rec)
        merged[name] = dense
    seconds = time.perf_counter() - t0
    with fidelity.swapped_weights(w.model, merged):
        fid = end_fidelity(w)
    extra = {"shifted_blocks": moved, "entropy_violations": violations} if inner else {}
    return {"layers": layers, "quantize_seconds": seconds, "fidelity": fid, "blocks": blocks, **extra}


# -- the driver ------------------------------------------------------------------------------


def _matches(patterns: str, label: str) -> bool:
    """``--rows``: comma-separated label substrings; ``=label`` matches that label only."""
    parts = [p for p in patterns.split(",") if p]
    return any(label == p[1:] if p.startswith("=") else p in label for p in parts)


def select_rows(s: IcqBenchSettings, kind: str) -> list[Row]:
    """The rows to measure, every config checked by its quantizer's config model (before any model loads)."""
    from lqmod.config import ConfigError, validate_config

    registry = get_registry()
    quantizers = registry.quantizers()
    if s.wrapper not in quantizers:
        raise SpecError(f"--wrapper {s.wrapper!r} is not a registered quantizer; registered: {sorted(quantizers)}")
    tau_n = TAU_N.get(kind, 12) if s.tau_n is None else s.tau_n
    if s.bases is not None:
        specs = parse_specs(s.bases, "lqmod")
        if not specs:
            raise SpecError("--bases is empty: give quantizer specs, e.g. 'nf:bits=4,blocksize=64'")
        for b in specs:
            if b.name not in quantizers:
                raise SpecError(f"base {b.name!r} is not a registered quantizer; registered: {sorted(quantizers)}")
            if b.lora or b.init:
                raise SpecError(f"base {b.label!r}: lora./init. keys do not apply here")
        rows = rows_for_bases(specs, s.wrapper, tau_n)
    else:
        rows = default_rows(kind, s.wrapper, s.tau_n)
    for r in rows:
        if r.base == "fp":
            continue
        try:
            validate_config(registry.quantizer(r.base).config_model, r.base_config, what=f"{r.base} config")
        except ConfigError as exc:
            raise SpecError(f"row {r.label!r}: {exc}") from None
    if s.rows and not any(_matches(s.rows, r.label) for r in rows):
        raise SpecError(f"--rows {s.rows!r} matches no row of this model")
    return rows


def run_icq_bench(s: IcqBenchSettings) -> dict[str, Any]:
    """Measure the missing rows (none with ``report_only``), read the others from the cache, write the report."""
    from lqmod.bench.icq_report import write_report
    from lqmod.bench.step0 import load_workload
    from lqmod.hf import resolve_model

    where = resolve_model(s.model)
    stem_model = where.name
    ws = WorkloadSettings(model=s.model, n_calib=s.n_calib, n_eval=s.n_eval, ctx=s.ctx, ppl_tokens=s.ppl_tokens,
                          cache=s.cache, progress=s.progress)  # fmt: skip
    cache = s.cache / f"{stem_model}-icq"
    kind: dict[str, str] = {}

    def workload() -> Workload:
        w = load_workload(ws)
        kind["kind"] = w.kind
        return w

    # The rows depend on the model's kind; a report from the cache reads it from the cached settings.
    settings_path = cache / "settings.json"
    if s.report_only:
        if not settings_path.is_file():
            raise FileNotFoundError(f"--report-only: no cached run in {cache}")
        import json

        kind["kind"] = json.loads(settings_path.read_text())["kind"]
        loaded = None
    else:
        loaded = workload()
    rows = select_rows(s, kind["kind"])
    t0 = time.perf_counter()
    results = run_cached(
        rows, cache=cache, schema=SCHEMA, workload=None if loaded is None else (lambda: loaded),
        run_row=lambda w, row, shared: run_row(w, row, shared, progress=s.progress),
        compute=lambda r: not s.rows or _matches(s.rows, r.label), progress=s.progress, desc="icq rows",
    )  # fmt: skip
    results["seconds"] = time.perf_counter() - t0
    results["env_end"] = {"load_average": list(os.getloadavg())}
    # MiniLM's results kept the name they were committed under before this mode existed.
    settings = results["settings"]
    write_report(results, s.out, s.name or ("icq" if settings["model"] == "minilm" else f"icq_{settings['model']}"))
    return results
