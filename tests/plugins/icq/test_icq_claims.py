"""What icq promises: more code entropy wherever it shifts, the shift's exact cost, and a weight
that is exactly ``base(W - tau_q) + tau_q``, served by the LUT kernels."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import lqmod
from lqmod.config import ConfigError, validate_config
from lqmod.quantize import quantize_weight, validate_qweight
from lqmod.types import QuantizedWeight
from lqmod_icq import ICQConfig, base_qweight, block_codes, block_entropy, shifts
from lqmod_icq.search import SIGMA, TAU_LEVELS, _candidate_factors

BASES: list[tuple[str, dict[str, Any]]] = [
    ("nf", {"bits": 4}),
    ("nf", {"bits": 3, "blocksize": 128}),
    ("nf", {"bits": 2, "blocksize": 32}),
    ("rtn", {"bits": 4, "group_size": 64, "symmetric": True}),
    ("rtn", {"bits": 3, "group_size": 64}),
]


def weight(shape: tuple[int, int] = (48, 512), seed: int = 0) -> torch.Tensor:
    """Gaussian rows with per-row offsets and a few outliers: blocks whose median is not 0."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02 + torch.randn(shape[0], 1, generator=gen) * 0.01
    idx = torch.randperm(w.numel(), generator=gen)[:20]
    w.view(-1)[idx] *= 15
    return w


def icq(base: str, base_config: dict[str, Any], w: torch.Tensor, **extra: Any) -> tuple[QuantizedWeight, Any]:
    registry = lqmod.get_registry()
    cfg = ICQConfig(base=base, base_config=base_config, **extra)
    qw = quantize_weight(registry.quantizer("icq"), w, cfg)
    return qw, cfg


@pytest.mark.parametrize(("base", "base_config"), BASES)
def test_entropy_rises_on_every_shifted_block_and_others_keep_the_plain_codes(
    base: str, base_config: dict[str, Any]
) -> None:
    registry = lqmod.get_registry()
    w = weight()
    qw, _ = icq(base, base_config, w, tau_n=12)
    spec = registry.quantizer(base)
    plain = quantize_weight(spec, w, base_config)
    plain_codes, bits = block_codes(spec, plain)
    codes, _ = block_codes(spec, base_qweight(qw))
    h_plain, h_icq = block_entropy(plain_codes, bits), block_entropy(codes, bits)
    shifted = qw.tensors["tau_codes"] != 0
    assert 0.2 < float(shifted.double().mean()) <= 1.0  # the search does move blocks
    assert bool((h_icq[shifted] > h_plain[shifted]).all())
    assert torch.equal(codes[~shifted], plain_codes[~shifted])
    assert float(h_icq.mean()) > float(h_plain.mean())
    assert qw.meta["entropy"] == pytest.approx(float(h_icq.mean()))
    assert qw.meta["entropy_plain"] == pytest.approx(float(h_plain.mean()))


@pytest.mark.parametrize(("base", "base_config"), BASES)
def test_weight_is_exactly_base_of_shifted_plus_stored_shift(base: str, base_config: dict[str, Any]) -> None:
    """The codes are computed on W - tau_q with the *stored* (rounded) shift, so the rounding adds
    no reconstruction error: each block's error is the base's error on the shifted block."""
    registry = lqmod.get_registry()
    spec, icq_spec = registry.quantizer(base), registry.quantizer("icq")
    w = weight(seed=1)
    qw, _ = icq(base, base_config, w, tau_n=12)
    tau = shifts(qw)
    group = w.numel() // tau.numel()
    shifted = (w.reshape(-1, group) - tau.unsqueeze(1)).view_as(w)
    again = quantize_weight(spec, shifted, base_config)
    stored = base_qweight(qw)
    assert all(torch.equal(again.tensors[k], stored.tensors[k]) for k in again.tensors)
    want = (spec.materialize(again, torch.float32).reshape(-1, group) + tau.unsqueeze(1)).view_as(w)
    assert torch.equal(icq_spec.materialize(qw, torch.float32), want)
    torch.testing.assert_close(
        icq_spec.materialize(qw, torch.float64),
        (spec.materialize(again, torch.float64).reshape(-1, group) + tau.double().unsqueeze(1)).view_as(w),
    )


@pytest.mark.parametrize(("base", "base_config"), BASES[:2] + BASES[3:4])
def test_stored_shift_is_a_grid_candidate_to_within_half_a_step(base: str, base_config: dict[str, Any]) -> None:
    """The stored shift's rounding: every non-zero shift lies within half an 8-bit step
    (scale / 2) of a candidate median + f * spread of the paper's grid."""
    w = weight(seed=2)
    tau_range, tau_n, tg = 0.1, 12, 64
    qw, _ = icq(base, base_config, w, tau_n=tau_n, tau_range=tau_range, tau_groupsize=tg)
    tau = shifts(qw).double()
    blocks = w.reshape(tau.numel(), -1).double()
    med = blocks.float().median(dim=1).values.double()
    spread = (blocks - med.unsqueeze(1)).abs().amax(dim=1)
    f = torch.tensor(_candidate_factors(tau_range, tau_n), dtype=torch.float64)
    cands = med.unsqueeze(1) + f.unsqueeze(0) * spread.unsqueeze(1)
    step = qw.tensors["tau_scale"].double().repeat_interleave(tg)[: tau.numel()]
    nearest = (cands - tau.unsqueeze(1)).abs().min(dim=1).values
    moved = qw.tensors["tau_codes"] != 0
    assert bool((nearest[moved] <= step[moved] / 2 * (1 + 1e-5) + 1e-9).all())
    # The step is small against the weights: at most (|median| + 0.1 sigma spread) / 127.
    bound = (med.abs() + tau_range * SIGMA * spread).view(-1, tg).amax(dim=1) / TAU_LEVELS
    torch.testing.assert_close(qw.tensors["tau_scale"].double(), bound, rtol=1e-6, atol=0)


def test_bits_per_param_is_exact_and_matches_plain_nf_at_twice_the_block() -> None:
    registry = lqmod.get_registry()
    icq_spec, nf = registry.quantizer("icq"), registry.quantizer("nf")
    shape = (64, 256)
    qw, cfg = icq("nf", {"bits": 4}, weight(shape))
    n, blocks = 64 * 256, 64 * 256 // 64
    nf_bits = 4 * n + 8 * blocks + 32 * math.ceil(blocks / 256) + 32  # codes, absmax codes, dq scales, offset
    want = (nf_bits + 8 * blocks + 32 * math.ceil(blocks / 256)) / n
    assert qw.bits_per_param() == want == icq_spec.bits_per_param(cfg, shape)
    assert want == 4.255859375
    # icq over NF-k at block 128 stores exactly as many bits as plain NF-k at block 64.
    for big in [(384, 1536), (576, 1536), (1536, 384)]:
        for bits in (2, 3, 4):
            icq_cfg = ICQConfig(base_config={"bits": bits, "blocksize": 128})
            plain_cfg = nf.config_model.model_validate({"bits": bits, "blocksize": 64})
            assert icq_spec.bits_per_param(icq_cfg, big) == nf.bits_per_param(plain_cfg, big), (big, bits)


def test_lut_format_is_base_plus_shift_and_the_native_kernel_runs_it() -> None:
    from lqmod.kernels import select_backend
    from lqmod.kernels.native import available

    registry = lqmod.get_registry()
    spec = registry.quantizer("icq")
    w = weight()
    qw, _ = icq("rtn", {"bits": 3, "group_size": 64}, w, tau_n=6)
    assert spec.lut_format is not None
    fmt = spec.lut_format(qw)
    assert fmt is not None and fmt.zeros is not None and fmt.group_size == 64
    if not available():
        pytest.skip("the native CPU kernel is not built here")
    backend = select_backend(qw, torch.device("cpu"), lut_format=spec.lut_format)
    assert type(backend).__name__ == "NativeLutBackend"
    x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(0))
    dense = spec.materialize(qw, torch.float32)
    torch.testing.assert_close(backend.linear(x, qw, spec.materialize), x @ dense.T, rtol=1e-5, atol=1e-6)


def test_config_refuses_bases_it_cannot_wrap() -> None:
    model = ICQConfig
    with pytest.raises(ConfigError, match="no lut_format"):
        validate_config(model, {"base": "quip"}, what="icq")
    with pytest.raises(ConfigError, match="needs statistics"):
        validate_config(model, {"base": "optq", "base_config": {"bits": 4}}, what="icq")
    with pytest.raises(ConfigError, match="cannot wrap itself"):
        validate_config(model, {"base": "icq"}, what="icq")
    with pytest.raises(ConfigError, match="bits"):
        validate_config(model, {"base_config": {"bits": 9}}, what="icq")


def test_validate_refuses_tampered_shifts() -> None:
    registry = lqmod.get_registry()
    spec = registry.quantizer("icq")
    qw, _ = icq("nf", {"bits": 4}, weight((16, 256)), tau_n=4)
    validate_qweight(spec, qw)

    def edited(**tensors: torch.Tensor) -> QuantizedWeight:
        return QuantizedWeight(qw.quantizer, qw.config, qw.shape, {**qw.tensors, **tensors}, qw.meta, qw.dtype)

    with pytest.raises(ValueError, match="tau_codes"):
        validate_qweight(spec, edited(tau_codes=qw.tensors["tau_codes"][:-1]))
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        validate_qweight(spec, edited(tau_codes=torch.full_like(qw.tensors["tau_codes"], -128)))
    with pytest.raises(ValueError, match="finite"):
        validate_qweight(spec, edited(tau_scale=torch.full_like(qw.tensors["tau_scale"], float("nan"))))
    with pytest.raises(ValueError, match="base"):
        validate_qweight(spec, edited(base_codes=qw.tensors["base_codes"][:-1]))


def test_checkpoint_round_trip_through_quantize_model(tiny_llama: torch.nn.Module, tmp_path: Any) -> None:
    from lqmod.io import load_checkpoint, save_checkpoint
    from lqmod.model import quantize_model

    quantize_model(tiny_llama, "icq", {"base_config": {"bits": 3}, "tau_n": 4}, lora={"r": 4}, progress=False)
    save_checkpoint(tiny_llama, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    ids = torch.randint(0, 101, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tiny_llama(ids).logits)
