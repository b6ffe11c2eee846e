"""The error table: exact bits, errors against a float64 reference, skips, cache, resume."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import lqmod
import lqmod_nf
from lqmod.allocation.cache import TableCache
from lqmod.allocation.options import collect_options
from lqmod.allocation.table import build_error_table
from lqmod.config import QuantizerConfig
from lqmod.plugins import Registry
from lqmod.types import LayerStats, Option, QuantizedWeight, QuantizerSpec
from lqmod_example_rtn.quantizer import RTNConfig
from lqmod_example_rtn.quantizer import bits_per_param as rtn_bits
from lqmod_example_rtn.quantizer import materialize as rtn_materialize
from lqmod_example_rtn.quantizer import quantize as rtn_quantize


class Counting:
    """A plug-in wrapping RTN under the name "count" that counts (and can fail) its quantize calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_after: int | None = None

    def quantize(self, w: torch.Tensor, cfg: RTNConfig, stats: LayerStats | None) -> QuantizedWeight:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls += 1
        return dataclasses.replace(rtn_quantize(w, cfg, stats), quantizer="count")

    @lqmod.hookimpl
    def lqmod_quantizers(self) -> Iterator[QuantizerSpec]:
        yield QuantizerSpec(
            "count",
            RTNConfig,
            self.quantize,
            rtn_materialize,
            rtn_bits,
            options=lambda: [RTNConfig(bits=b, group_size=g) for b in (2, 3, 4) for g in (32, 64)],
        )


class NeedsHessian:
    @lqmod.hookimpl
    def lqmod_quantizers(self) -> Iterator[QuantizerSpec]:
        def quantize(w: torch.Tensor, cfg: QuantizerConfig, stats: LayerStats | None) -> QuantizedWeight:
            raise AssertionError("must not be called without a Hessian")

        yield QuantizerSpec(
            "hess",
            QuantizerConfig,
            quantize,
            lambda qw, dtype: torch.zeros(qw.shape, dtype=dtype),
            lambda cfg, shape: 32.0,
            options=lambda: [QuantizerConfig()],
            needs=frozenset({"hessian"}),
        )


@pytest.fixture
def counting() -> Counting:
    return Counting()


@pytest.fixture
def reg(counting: Counting) -> Registry:
    r = Registry(autoload=False)
    r.register(lqmod_nf, name="nf")
    r.register(counting, name="count")
    r.register(NeedsHessian(), name="hess")
    return r


def weights(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    # in_features 96: group/block size 64 does not divide it, 32 does.
    return [("a", torch.randn(16, 96, generator=g)), ("b", torch.randn(8, 64, generator=g) * 0.1)]


def test_bits_and_errors_are_exact(reg: Registry, tmp_path: Path) -> None:
    opts = collect_options(reg)
    table = build_error_table(weights(), opts, cache=tmp_path, registry=reg, progress=False)
    checked = 0
    for name, w in weights():
        for cand in table.candidates[name]:
            spec = reg.quantizer(cand.option.quantizer)
            qw = lqmod.quantize_weight(spec, w, cand.option.config)
            assert cand.bits == qw.storage_bits()
            assert cand.bits == spec.bits_per_param(cand.option.config, (w.shape[0], w.shape[1])) * w.numel()
            ref = ((w.double() - spec.materialize(qw, torch.float32).double()) ** 2).sum().item()
            assert cand.error == pytest.approx(ref, rel=1e-12)
            checked += 1
    assert checked == sum(len(r) for r in table.candidates.values()) > 20


def test_skip_reasons_are_recorded(reg: Registry, tmp_path: Path) -> None:
    opts = collect_options(reg)
    table = build_error_table(weights(), opts, cache=tmp_path, registry=reg, progress=False)
    reasons = dict(table.skipped["a"])
    assert "needs calibration statistics ['hessian']" in reasons["hess()"]
    bad_rtn = Option("count", RTNConfig(bits=2, group_size=64)).label
    assert "not a multiple of group_size=64" in reasons[bad_rtn]
    assert any("not a multiple of blocksize" in r for r in reasons.values())
    labels = {c.option.label for c in table.candidates["a"]}
    assert bad_rtn not in labels
    assert Option("count", RTNConfig(bits=2, group_size=64)).label in {c.option.label for c in table.candidates["b"]}
    # every option is either a candidate or skipped, for every matrix
    for name in ("a", "b"):
        assert len(table.candidates[name]) + len(table.skipped[name]) == len(opts)
    assert table.skip_reasons()["hess()"] == {"needs calibration statistics ['hessian'], not supplied": 2}


def test_options_are_deduplicated(reg: Registry) -> None:
    opts = collect_options(reg)
    keys = [(o.quantizer, o.config.model_dump_json()) for o in opts]
    assert len(keys) == len(set(keys))
    assert len(collect_options(reg, ["count", "count"])) == 6
    with pytest.raises(lqmod.UnknownPluginError, match="Choose one of: count, hess, nf"):
        collect_options(reg, ["nope"])


def test_cache_hit_quantizes_nothing(reg: Registry, counting: Counting, tmp_path: Path) -> None:
    opts = collect_options(reg, ["count"])
    first = build_error_table(weights(), opts, cache=tmp_path, registry=reg, progress=False)
    n = counting.calls
    assert n == 6 + 3  # group 64 does not fit matrix "a": no quantize call (bits_per_param says so)
    second = build_error_table(weights(), opts, cache=tmp_path, registry=reg, progress=False)
    assert counting.calls == n
    assert second.candidates == first.candidates
    assert second.skipped == first.skipped
    assert (second.computed, second.cached) == (0, 12)
    # no cache: quantized again
    build_error_table(weights(), opts, cache=False, registry=reg, progress=False)
    assert counting.calls == 2 * n


def test_cache_is_invalidated_by_a_changed_weight(reg: Registry, counting: Counting, tmp_path: Path) -> None:
    opts = collect_options(reg, ["count"])
    build_error_table(weights(), opts, cache=tmp_path, registry=reg, progress=False)
    n = counting.calls
    changed = weights()
    changed[1][1][0, 0] += 1e-3
    table = build_error_table(changed, opts, cache=tmp_path, registry=reg, progress=False)
    assert counting.calls == n + 6  # only "b" was recomputed
    assert table.cached == 6


def test_interrupted_run_resumes(reg: Registry, counting: Counting, tmp_path: Path) -> None:
    opts = collect_options(reg, ["count"])
    counting.fail_after = 7  # all of "a" (3 quantize calls) and 4 of "b"
    with pytest.raises(RuntimeError, match="interrupted"):
        build_error_table(weights(), opts, cache=tmp_path, registry=reg, progress=False)
    assert counting.calls == 7
    counting.fail_after = None
    table = build_error_table(weights(), opts, cache=tmp_path, registry=reg, progress=False)
    assert counting.calls == 9  # only the 2 missing options of "b"
    reference = build_error_table(weights(), opts, cache=False, registry=reg, progress=False)
    assert table.candidates == reference.candidates


def test_damaged_cache_file_is_recomputed(reg: Registry, counting: Counting, tmp_path: Path) -> None:
    opts = collect_options(reg, ["count"])
    build_error_table(weights(), opts, cache=tmp_path, registry=reg, progress=False)
    for f in (tmp_path / "error-table").rglob("*.json"):
        f.write_text("{not json")
    n = counting.calls
    build_error_table(weights(), opts, cache=TableCache(tmp_path), registry=reg, progress=False)
    assert counting.calls == 2 * n


def test_fisher_weighting(reg: Registry, tmp_path: Path) -> None:
    opts = collect_options(reg, ["count"])
    ws = weights()
    g = torch.Generator().manual_seed(1)
    stats = {n: LayerStats(fisher=torch.rand(w.shape, generator=g) * 10) for n, w in ws}
    table = build_error_table(ws, opts, stats=stats, cache=tmp_path, registry=reg, progress=False)
    plain = build_error_table(ws, opts, cache=tmp_path, registry=reg, progress=False)
    assert table.weighting == "fisher"
    assert plain.weighting == "frobenius"
    spec = reg.quantizer("count")
    for name, w in ws:
        for cand, unweighted in zip(table.candidates[name], plain.candidates[name], strict=True):
            qw = lqmod.quantize_weight(spec, w, cand.option.config)
            d = w.double() - spec.materialize(qw, torch.float32).double()
            fisher = stats[name].fisher
            assert fisher is not None
            assert cand.error == pytest.approx((fisher.double() * d * d).sum().item(), rel=1e-12)
            assert cand.error != pytest.approx(unweighted.error)  # a different cache entry, not a stale hit


def test_fisher_for_some_matrices_only_is_an_error(reg: Registry) -> None:
    ws = weights()
    stats = {"a": LayerStats(fisher=torch.ones(16, 96))}
    with pytest.raises(ValueError, match="Fisher"):
        build_error_table(ws, collect_options(reg, ["count"]), stats=stats, cache=False, registry=reg, progress=False)


def test_fisher_shape_mismatch(reg: Registry) -> None:
    stats: dict[str, Any] = {n: LayerStats(fisher=torch.ones(w.shape[1], w.shape[0])) for n, w in weights()}
    with pytest.raises(ValueError, match="Fisher shape"):
        build_error_table(
            weights(), collect_options(reg, ["count"]), stats=stats, cache=False, registry=reg, progress=False
        )


def test_default_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LQMOD_CACHE", str(tmp_path / "c"))
    assert TableCache().root == tmp_path / "c"
    monkeypatch.delenv("LQMOD_CACHE")
    assert TableCache().root == Path.home() / ".cache" / "lqmod"
