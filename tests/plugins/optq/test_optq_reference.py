"""OPTQ against a plain float64 reference of the algorithm, RTN, and its own error handling."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from optq_testdata import calibration_inputs, hessian_stats, objective

import lqmod
from lqmod.kernels.reference import materialize_lut
from lqmod.quantize import QuantizationError
from lqmod.types import LayerStats
from lqmod_optq import OPTQConfig
from lqmod_optq.algorithm import normalised_hessian, optq
from lqmod_optq.quantizer import quantize as optq_quantize

torch.set_num_threads(1)


def reference_grid(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's min-max grid per row, written out independently; scales rounded to float16."""
    maxq = 2**bits - 1
    lo = x.min(dim=1).values.clamp(max=0)
    hi = x.max(dim=1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    both_zero = (lo == 0) & (hi == 0)
    lo[both_zero], hi[both_zero] = -1.0, 1.0
    scale = ((hi - lo) / maxq).half().double()
    zero = torch.full_like(lo, 2 ** (bits - 1)) if sym else torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


Grid = Callable[[torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor]]


def reference_optq(
    w: torch.Tensor,
    h: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    damp: float,
    desc_act: bool,
    grid: Grid = reference_grid,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unblocked OPTQ in float64: every update applied to every later column at once.

    Returns the dequantized weight and the codes, both in the original column order; ``grid``
    fits a group's (scale, zero point).
    """
    w = w.double().clone()
    h = h.double().clone()
    n = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if desc_act else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h = h + damp * torch.diagonal(h).mean() * torch.eye(n, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    q_all = torch.zeros_like(w)
    codes = torch.zeros(w.shape, dtype=torch.int64)
    for j in range(n):
        if j % group_size == 0:
            scale, zero = grid(w[:, j : j + group_size], bits, sym)
        q = torch.clamp(torch.round(w[:, j] / scale) + zero, 0, 2**bits - 1)
        codes[:, j] = q.long()
        q_all[:, j] = (q - zero) * scale
        err = (w[:, j] - q_all[:, j]) / u[j, j]
        w[:, j:] -= torch.outer(err, u[j, j:])
    inv = torch.argsort(perm)
    return q_all[:, inv], codes[:, inv]


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor, LayerStats]:
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(24, 96, generator=gen) * 0.02
    x = calibration_inputs(96, n_tokens=512, seed=3, dead=(5, 40))
    stats = hessian_stats(x)
    return w, normalised_hessian(stats.hessian, stats.n_tokens, 96), stats


@pytest.mark.parametrize(
    ("bits", "group_size", "sym", "desc_act", "block_size"),
    [
        (4, 32, True, False, 16),  # groups straddle lazy blocks
        (3, 8, False, False, 32),  # several groups start inside one block
        (2, 96, False, True, 40),  # one group per row, act-order, ragged last block
        (4, 16, False, True, 24),  # act-order groups
        (8, 32, True, True, 128),  # one block
    ],
)
def test_matches_unblocked_float64_reference(
    problem: tuple[torch.Tensor, torch.Tensor, LayerStats],
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    block_size: int,
) -> None:
    w, h, _ = problem
    want, want_codes = reference_optq(w, h, bits=bits, group_size=group_size, sym=sym, damp=0.01, desc_act=desc_act)
    res = optq(
        w, h, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, damp=0.01,
        block_size=block_size, group_fit="updated", dtype=torch.float64,
    )  # fmt: skip
    # The blocked sweep sums the same updates in another order: float64 noise only, so no
    # code may differ (a rounding tie at 1e-16 would be the only excuse, and none occurs here).
    assert torch.equal(res.codes, want_codes)
    groups = res.g_idx
    got = (res.codes - res.zeros[:, groups]).double() * res.scales.double()[:, groups]
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    # The float32 sweep used by quantize() agrees up to float32 rounding near ties.
    res32 = optq(
        w, h, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, damp=0.01, block_size=block_size,
        group_fit="updated",
    )  # fmt: skip
    agree = float((res32.codes == want_codes).double().mean())
    assert agree > 0.99, f"float32 codes agree with the float64 reference on only {agree:.4f}"
    got32 = (res32.codes - res32.zeros[:, res32.g_idx]).double() * res32.scales.double()[:, res32.g_idx]
    assert objective(w, got32, h) == pytest.approx(objective(w, want, h), rel=0.02)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("desc_act", [False, True])
def test_objective_below_rtn_with_the_same_grid(bits: int, desc_act: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(32, 128, generator=gen) * 0.02
    stats = hessian_stats(calibration_inputs(128, n_tokens=1024, seed=5))
    h = normalised_hessian(stats.hessian, stats.n_tokens, 128)
    registry = lqmod.get_registry()
    optq_spec, rtn_spec = registry.quantizer("optq"), registry.quantizer("rtn")
    cfg = {"bits": bits, "group_size": 64, "sym": False, "desc_act": desc_act}
    qw = lqmod.quantize_weight(optq_spec, w, cfg, stats)
    # The rtn plug-in's asymmetric grid is GPTQ's min-max grid (range widened to include 0,
    # float16 scales, packed zero points): same grid, same storage without act-order.
    rq = lqmod.quantize_weight(rtn_spec, w, {"bits": bits, "group_size": 64, "symmetric": False})
    if not desc_act:
        assert qw.bits_per_param() == rq.bits_per_param()
    ours = objective(w, optq_spec.materialize(qw, torch.float64), h)
    rtn = objective(w, rtn_spec.materialize(rq, torch.float64), h)
    assert ours < 0.8 * rtn, f"OPTQ objective {ours:.4g} vs RTN {rtn:.4g}"


def test_identity_hessian_is_round_to_nearest() -> None:
    # With uncorrelated, equally scaled inputs there is nothing to feed back: OPTQ is RTN.
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    stats = LayerStats(hessian=torch.eye(64, dtype=torch.float64) * 3.0, n_tokens=3)
    registry = lqmod.get_registry()
    ours = registry.quantizer("optq").materialize(
        lqmod.quantize_weight(registry.quantizer("optq"), w, {"bits": 3, "group_size": 32, "sym": False}, stats),
        torch.float32,
    )
    rtn_spec = registry.quantizer("rtn")
    rtn = rtn_spec.materialize(lqmod.quantize_weight(rtn_spec, w, {"bits": 3, "group_size": 32}), torch.float32)
    assert torch.equal(ours, rtn)


def test_act_order_g_idx_and_lut_format(problem: tuple[torch.Tensor, torch.Tensor, LayerStats]) -> None:
    w, h, stats = problem
    spec = lqmod.get_registry().quantizer("optq")
    qw = lqmod.quantize_weight(spec, w, {"bits": 4, "group_size": 16, "desc_act": True, "sym": False}, stats)
    g_idx = qw.tensors["g_idx"]
    assert g_idx.dtype == torch.int32 and g_idx.shape == (96,)
    # Group k holds the k-th run of 16 columns in decreasing-Hessian-diagonal order.
    d = torch.diagonal(h).clone()
    d[d == 0] = 1.0  # dead columns get a unit diagonal before the ordering, as in GPTQ
    order = torch.argsort(d, descending=True, stable=True)
    assert torch.equal(g_idx[order].long(), torch.arange(96) // 16)
    assert torch.equal(torch.bincount(g_idx.long()), torch.full((6,), 16))
    assert not torch.equal(g_idx.long(), torch.arange(96) // 16)
    assert spec.lut_format is not None
    fmt = spec.lut_format(qw)
    assert fmt is not None and fmt.g_idx is g_idx
    assert torch.equal(materialize_lut(fmt, torch.float32), spec.materialize(qw, torch.float32))


def test_dead_inputs_get_zero_weights(problem: tuple[torch.Tensor, torch.Tensor, LayerStats]) -> None:
    w, _, stats = problem
    spec = lqmod.get_registry().quantizer("optq")
    qw = lqmod.quantize_weight(spec, w, {"bits": 4, "group_size": 32}, stats)
    assert qw.meta["dead_columns"] == 2
    dense = spec.materialize(qw, torch.float32)
    assert torch.equal(dense[:, [5, 40]], torch.zeros(24, 2))


def test_block_size_does_not_change_the_result(problem: tuple[torch.Tensor, torch.Tensor, LayerStats]) -> None:
    w, _, stats = problem
    spec = lqmod.get_registry().quantizer("optq")
    dense = [
        spec.materialize(optq_quantize(w, OPTQConfig(bits=3, group_size=16, block_size=b, group_fit="updated"), stats,
                                       compute_dtype=torch.float64), torch.float64)
        for b in (7, 16, 96)
    ]  # fmt: skip
    assert torch.equal(dense[0], dense[1]) and torch.equal(dense[1], dense[2])


def test_deterministic(problem: tuple[torch.Tensor, torch.Tensor, LayerStats]) -> None:
    w, _, stats = problem
    spec = lqmod.get_registry().quantizer("optq")
    a = lqmod.quantize_weight(spec, w, {"bits": 3, "desc_act": True, "group_size": 32}, stats)
    b = lqmod.quantize_weight(spec, w, {"bits": 3, "desc_act": True, "group_size": 32}, stats)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_static_groups_keep_consecutive_columns(problem: tuple[torch.Tensor, torch.Tensor, LayerStats]) -> None:
    w, _, stats = problem
    spec = lqmod.get_registry().quantizer("optq")
    qw = lqmod.quantize_weight(spec, w, {"bits": 4, "group_size": 32, "desc_act": True, "static_groups": True}, stats)
    assert "g_idx" not in qw.tensors
    assert spec.lut_format is not None
    fmt = spec.lut_format(qw)
    assert fmt is not None and fmt.g_idx is None
    assert torch.equal(materialize_lut(fmt, torch.float32), spec.materialize(qw, torch.float32))


# -- bad input -------------------------------------------------------------------------------


def test_missing_or_misshapen_hessian_is_refused() -> None:
    spec = lqmod.get_registry().quantizer("optq")
    w = torch.randn(8, 32) * 0.02
    with pytest.raises(QuantizationError, match=r"stats\.hessian"):
        spec.quantize(w, OPTQConfig(group_size=32), LayerStats())
    with pytest.raises(QuantizationError, match=r"\(in_features, in_features\) = \(32, 32\)"):
        lqmod.quantize_weight(spec, w, {"group_size": 32}, LayerStats(hessian=torch.eye(16), n_tokens=1))
    bad = torch.eye(32, dtype=torch.float64)
    bad[3, 3] = float("nan")
    with pytest.raises(QuantizationError, match="non-finite"):
        lqmod.quantize_weight(spec, w, {"group_size": 32}, LayerStats(hessian=bad, n_tokens=1))


def test_group_size_must_divide_in_features() -> None:
    spec = lqmod.get_registry().quantizer("optq")
    stats = LayerStats(hessian=torch.eye(96, dtype=torch.float64), n_tokens=1)
    with pytest.raises(QuantizationError, match=r"not a multiple of group_size=64.*32, 96|group sizes that fit"):
        lqmod.quantize_weight(spec, torch.randn(8, 96), {"group_size": 64}, stats)
    with pytest.raises(lqmod.ConfigError, match="group_size"):
        lqmod.quantize_weight(spec, torch.randn(8, 96), {"group_size": 0}, stats)
    with pytest.raises(lqmod.ConfigError, match="bits"):
        lqmod.quantize_weight(spec, torch.randn(8, 96), {"bits": 5}, stats)


def test_indefinite_hessian_gets_more_damping_then_fails_clearly() -> None:
    spec = lqmod.get_registry().quantizer("optq")
    n = 32
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    evals = torch.ones(n, dtype=torch.float64)
    evals[0] = -0.05  # damping 0.01 x mean diagonal (~0.97) cannot lift this; 0.1 x can
    h = (q * evals) @ q.T
    w = torch.randn(8, n) * 0.02
    qw = lqmod.quantize_weight(spec, w, {"group_size": 32}, LayerStats(hessian=h, n_tokens=1))
    assert qw.meta["damp_retries"] == 1
    assert qw.meta["damp_used"] == pytest.approx(0.1)
    negative = LayerStats(hessian=-torch.eye(n, dtype=torch.float64), n_tokens=1)
    with pytest.raises(QuantizationError, match="not positive definite"):
        lqmod.quantize_weight(spec, w, {"group_size": 32}, negative)


def test_group_fit_modes_agree_only_when_groups_start_on_block_boundaries(
    problem: tuple[torch.Tensor, torch.Tensor, LayerStats],
) -> None:
    w, h, _ = problem

    def run(group_fit: str, group_size: int, block_size: int) -> torch.Tensor:
        res = optq(w, h, bits=3, group_size=group_size, sym=False, damp=0.01, block_size=block_size,
                   group_fit=group_fit, dtype=torch.float64)  # fmt: skip
        return res.codes

    # Every group starts at a block start: no pending in-block updates, one definition.
    assert torch.equal(run("reference", 32, 16), run("updated", 32, 16))
    # Groups of 16 inside blocks of 48: the reference fit ignores the block's pending updates.
    assert not torch.equal(run("reference", 16, 48), run("updated", 16, 48))
    with pytest.raises(lqmod.QuantizationError, match="group_fit"):
        optq(w, h, bits=3, group_size=16, group_fit="other")
