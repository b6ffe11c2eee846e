"""OPTQ with one byte per group scale (``scale_bits=8``): the algorithm, the storage, the formats."""

from __future__ import annotations

import math

import pytest
import torch
from optq_testdata import calibration_inputs, hessian_stats
from test_optq_reference import reference_optq

import lqmod
from lqmod.kernels import select_backend
from lqmod.kernels.reference import materialize_lut
from lqmod.types import LayerStats, QuantizedWeight
from lqmod_optq import OPTQConfig
from lqmod_optq.algorithm import normalised_hessian
from lqmod_optq.gptq_format import from_gptq, to_gptq
from lqmod_optq.quantizer import group_scales

torch.set_num_threads(1)


def _problem(out_f: int = 32, in_f: int = 96, seed: int = 4) -> tuple[torch.Tensor, LayerStats]:
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[3, 10] = 0.3  # one outlier: its group's scale sits far above the others
    return w, hessian_stats(calibration_inputs(in_f, n_tokens=512, seed=seed + 1))


def _quantize(w: torch.Tensor, stats: LayerStats, **cfg: object) -> QuantizedWeight:
    return lqmod.quantize_weight(lqmod.get_registry().quantizer("optq"), w, cfg, stats)


def _byte_level(raw: torch.Tensor, ref: float) -> torch.Tensor:
    """The float64 reference of the byte grid: nearest level in log2, written out independently."""
    c = torch.clamp(torch.round(16 * torch.log2(ref / raw.clamp(min=1e-300))), 0, 255)
    return torch.tensor([float(torch.tensor(ref * 2.0 ** (-k / 16)).half()) for k in c.flatten().tolist()],
                        dtype=torch.float64).view(raw.shape)  # fmt: skip


@pytest.mark.parametrize(("bits", "sym", "desc_act"), [(3, False, False), (4, True, False), (2, False, True)])
def test_matches_a_float64_reference_with_byte_scales(bits: int, sym: bool, desc_act: bool) -> None:
    w, stats = _problem()
    h = normalised_hessian(stats.hessian, stats.n_tokens, w.shape[1])
    qw = _quantize(w, stats, bits=bits, group_size=32, sym=sym, desc_act=desc_act, scale_bits=8,
                   group_fit="updated", block_size=16)  # fmt: skip
    ref = float(qw.tensors["scale_ref"][0])
    # The reference rounds the min-max scale to the byte grid where GPTQ rounds it to float16.

    def byte_grid(x: torch.Tensor, b: int, s: bool) -> tuple[torch.Tensor, torch.Tensor]:
        maxq = 2**b - 1
        lo, hi = x.min(dim=1).values.clamp(max=0), x.max(dim=1).values.clamp(min=0)
        if s:
            hi = torch.maximum(lo.abs(), hi)
            lo = -hi
        both_zero = (lo == 0) & (hi == 0)
        lo[both_zero], hi[both_zero] = -1.0, 1.0
        scale = _byte_level((hi - lo) / maxq, ref)
        zero = torch.full_like(lo, 2 ** (b - 1)) if s else torch.clamp(torch.round(-lo / scale), 0, maxq)
        return scale, zero

    want, _ = reference_optq(w, h, bits=bits, group_size=32, sym=sym, damp=0.01, desc_act=desc_act, grid=byte_grid)
    spec = lqmod.get_registry().quantizer("optq")
    got = spec.materialize(qw, torch.float64)
    # float32 sweep against the float64 reference: codes agree but for float32 ties.
    agree = float((got == want).double().mean())
    assert agree > 0.98, agree
    assert torch.equal(spec.materialize(qw, torch.float32).double(), got)


def test_every_scale_is_within_the_grid_step_of_its_min_max_scale() -> None:
    w, stats = _problem(in_f=128)
    qw = _quantize(w, stats, bits=4, group_size=32, sym=True, scale_bits=8, static_groups=True)
    raw = w.double().view(32, 4, 32).abs().amax(-1) * 2 / 15
    s = group_scales(qw).double()
    step = 2 ** (1 / 32)  # half a grid step in ratio, plus float16 rounding
    ratio = s / raw
    assert bool(((ratio <= step * (1 + 2**-10)) & (ratio >= (1 / step) * (1 - 2**-10))).all()), ratio


def test_storage_is_exact_and_below_float16_scales() -> None:
    spec = lqmod.get_registry().quantizer("optq")
    w, stats = _problem(out_f=48, in_f=96)
    for cfg in ({"bits": 3, "group_size": 32, "sym": False}, {"bits": 2, "group_size": 96, "sym": True}):
        byte = _quantize(w, stats, **cfg, scale_bits=8)
        half = _quantize(w, stats, **cfg)
        assert sorted(byte.tensors) == sorted({*half.tensors} - {"scales"} | {"scale_codes", "scale_ref"})
        n = 48 * 96
        groups = 48 * 96 // int(cfg["group_size"])
        assert byte.bits_per_param() == half.bits_per_param() - (8 * groups - 32) / n
        assert spec.bits_per_param(OPTQConfig(**cfg, scale_bits=8), (48, 96)) == byte.bits_per_param()
    # SmolLM2's shapes at groups of 96, asymmetric: fewer bits than NF3 with double quantization.
    nf = lqmod.get_registry().quantizer("nf")
    for shape in ((576, 576), (1536, 576), (576, 1536), (192, 576)):
        optq_bits = spec.bits_per_param(OPTQConfig(bits=3, group_size=96, sym=False, scale_bits=8), shape)
        nf_cfg = nf.config_model.model_validate({"bits": 3, "blocksize": 64, "double_quant": True})
        nf_bits = nf.bits_per_param(nf_cfg, shape)
        assert optq_bits < nf_bits, (shape, optq_bits, nf_bits)
        assert math.isclose(optq_bits, 3 + 11 / 96 + 32 / (shape[0] * shape[1]))


@pytest.mark.parametrize("desc_act", [False, True])
def test_kernel_and_gptq_export_give_the_same_weight(desc_act: bool) -> None:
    spec = lqmod.get_registry().quantizer("optq")
    w, stats = _problem(out_f=64, in_f=128)
    qw = _quantize(w, stats, bits=3, group_size=32, sym=False, desc_act=desc_act, scale_bits=8)
    dense = spec.materialize(qw, torch.float32)
    assert spec.lut_format is not None
    backend = select_backend(qw, torch.device("cpu"), lut_format=spec.lut_format)
    assert torch.equal(backend.weight(qw, spec.materialize, torch.float32), dense)  # type: ignore[attr-defined]
    fmt = spec.lut_format(qw)
    assert fmt is not None
    assert torch.equal(materialize_lut(fmt, torch.float32), dense)
    t = to_gptq(qw, checkpoint_format="gptq_v2")
    back = from_gptq(t, bits=3, group_size=32, sym=False, checkpoint_format="gptq_v2", config=qw.config)
    assert back.config["scale_bits"] == 16 and "scales" in back.tensors
    assert torch.equal(spec.materialize(back, torch.float32), dense)


def test_a_bad_reference_is_refused_when_loaded() -> None:
    w, stats = _problem()
    qw = _quantize(w, stats, bits=3, group_size=32, sym=False, scale_bits=8)
    spec = lqmod.get_registry().quantizer("optq")
    assert spec.validate is not None
    bad = QuantizedWeight(qw.quantizer, qw.config, qw.shape, {**qw.tensors, "scale_ref": torch.tensor([0.0])})
    with pytest.raises(ValueError, match=r"scale_ref is 0\.0; the reference of the byte scales must be finite and > 0"):
        spec.validate(bad, OPTQConfig(**qw.config))
    with pytest.raises(ValueError, match="scale_bits"):
        OPTQConfig(bits=3, scale_bits=4)
