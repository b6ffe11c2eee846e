"""Interop with GPTQModel 7.6 (its GPTQ, its packing, its TorchLinear), on the CPU.

Run with ``PYTHONPATH=/tmp/gptq_site GPTQMODEL_CPU_WORKERS=2``; skipped when gptqmodel does not
import. Importing gptqmodel alone takes ~15 s, hence ``slow``. Its native pack extension is
disabled (``GPTQMODEL_DISABLE_PACK_EXT``) so that GPTQModel's Python packing code, the
reference layout, is what runs (and nothing is compiled).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from optq_testdata import calibration_inputs, hessian_stats, objective

import lqmod
from lqmod_optq.algorithm import normalised_hessian
from lqmod_optq.gptq_format import from_gptq, to_gptq

pytestmark = [pytest.mark.slow, pytest.mark.gptqmodel]
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
try:
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module, convert_gptq_v2_to_v1_format_module
except Exception as exc:  # gptqmodel is optional; any import failure means "not available here"
    pytest.skip(f"gptqmodel is not importable ({type(exc).__name__}: {exc})", allow_module_level=True)

torch.set_num_threads(1)
OUT_F, IN_F, GROUP = 64, 128, 32
CASES = [(4, True, False), (3, False, True), (2, False, False), (8, True, True), (4, False, True)]


@pytest.fixture(autouse=True)
def _python_packing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(OUT_F, IN_F, generator=torch.Generator().manual_seed(0)) * 0.02
    return w, calibration_inputs(IN_F, n_tokens=512, seed=1)


def _torch_linear(bits: int, sym: bool, desc_act: bool) -> Any:
    return TorchLinear(
        bits=bits, group_size=GROUP, sym=sym, desc_act=desc_act, in_features=IN_F, out_features=OUT_F, bias=False
    )


def _gptqmodel_dequant(ql: Any) -> torch.Tensor:
    # The generic PackableQuantLinear path (no torch.compile, no Triton): (in, out) float16.
    return PackableQuantLinear.dequantize_weight(ql)


def _gptqmodel_quantize(
    w: torch.Tensor, x: torch.Tensor, bits: int, sym: bool, desc_act: bool, block_size: int = 128
) -> tuple[Any, Any]:
    lin = torch.nn.Linear(IN_F, OUT_F, bias=False)
    lin.weight.data = w.clone()
    cfg = QuantizeConfig(
        bits=bits, group_size=GROUP, desc_act=desc_act, sym=sym, act_group_aware=False, offload_to_disk=False
    )
    gptq = GPTQ(lin, cfg)
    gptq.quantizer.configure(perchannel=True)
    gptq.add_batch(x.float().unsqueeze(0), None)
    scale, zero, g_idx, *_ = gptq.hf_quantize(
        blocksize=block_size, group_size=GROUP, actorder=desc_act, percdamp=0.01, act_group_aware=False
    )
    ql = _torch_linear(bits, sym, desc_act)
    ql.pack_block(lin, scale, zero, g_idx)  # GPTQModel's own packing (Python path)
    return lin, ql


@pytest.mark.parametrize(("bits", "sym", "desc_act"), CASES)
def test_reader_dequantizes_gptqmodel_packing_exactly(
    problem: tuple[torch.Tensor, torch.Tensor], bits: int, sym: bool, desc_act: bool
) -> None:
    w, x = problem
    lin, ql = _gptqmodel_quantize(w, x, bits, sym, desc_act)
    expected = _gptqmodel_dequant(ql).T  # (out, in) float16
    spec = lqmod.get_registry().quantizer("optq")
    # In memory GPTQModel's TorchLinear holds v2 zero points.
    tensors = {k: getattr(ql, k).clone() for k in ("qweight", "qzeros", "scales", "g_idx")}
    qw = from_gptq(tensors, bits=bits, group_size=GROUP, sym=sym, checkpoint_format="gptq_v2")
    assert torch.equal(spec.materialize(qw, torch.float16), expected)
    # GPTQModel's own v2 -> v1 conversion (what it writes to disk) read back as v1.
    convert_gptq_v2_to_v1_format_module(ql, QuantizeConfig(bits=bits, group_size=GROUP, sym=sym))
    v1 = {k: getattr(ql, k).clone() for k in ("qweight", "qzeros", "scales", "g_idx")}
    qw1 = from_gptq(v1, bits=bits, group_size=GROUP, sym=sym, checkpoint_format="gptq")
    assert all(torch.equal(qw1.tensors[k], qw.tensors[k]) for k in qw.tensors)
    # And they are GPTQModel's own quantization Q, which used float32 scales: the stored float16
    # scales move each weight by at most |q - z| * scale * 2^-11 <= max|W| * 2^-10.
    atol = float(w.abs().max()) * 2**-10
    torch.testing.assert_close(spec.materialize(qw, torch.float32), lin.weight.data, rtol=0, atol=atol)


@pytest.mark.parametrize(("bits", "sym", "desc_act"), CASES)
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptqmodel_loads_what_the_writer_packs(
    problem: tuple[torch.Tensor, torch.Tensor], bits: int, sym: bool, desc_act: bool, fmt: str
) -> None:
    w, x = problem
    spec = lqmod.get_registry().quantizer("optq")
    qw = lqmod.quantize_weight(
        spec, w, {"bits": bits, "group_size": GROUP, "sym": sym, "desc_act": desc_act}, hessian_stats(x)
    )
    ql = _torch_linear(bits, sym, desc_act)
    for key, value in to_gptq(qw, checkpoint_format=fmt).items():
        getattr(ql, key).copy_(value)
    if fmt == "gptq":
        convert_gptq_v1_to_v2_format_module(ql, bits=bits, pack_dtype=torch.int32)
    ql.eval()
    dense16 = spec.materialize(qw, torch.float16)
    assert torch.equal(_gptqmodel_dequant(ql).T, dense16)
    xs = torch.randn(5, IN_F, generator=torch.Generator().manual_seed(3)).half()
    with torch.no_grad():
        y = ql(xs)
    torch.testing.assert_close(y.float(), xs.float() @ dense16.float().T, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(("group_fit", "gptqmodel_block"), [("reference", 128), ("updated", GROUP)])
@pytest.mark.parametrize(("bits", "sym", "desc_act"), CASES)
def test_same_algorithm_as_gptqmodel(
    problem: tuple[torch.Tensor, torch.Tensor],
    bits: int,
    sym: bool,
    desc_act: bool,
    group_fit: str,
    gptqmodel_block: int,
) -> None:
    # Same settings, same Hessian, same proxy loss. group_fit="reference" is GPTQModel's own
    # group fitting at the same block size (128); group_fit="updated" fits every group on
    # fully error-updated weights, which GPTQModel does too once its block size equals the
    # group size (see the README). The codes still drift apart (lqmod rounds scales to
    # float16 before using them, GPTQModel after), so the check is on the loss minimised.
    w, x = problem
    lin, _ = _gptqmodel_quantize(w, x, bits, sym, desc_act, block_size=gptqmodel_block)
    stats = hessian_stats(x)
    spec = lqmod.get_registry().quantizer("optq")
    cfg = {"bits": bits, "group_size": GROUP, "sym": sym, "desc_act": desc_act, "group_fit": group_fit}
    ours = spec.materialize(lqmod.quantize_weight(spec, w, cfg, stats), torch.float32)
    h = normalised_hessian(stats.hessian, stats.n_tokens, IN_F)
    assert objective(w, ours, h) == pytest.approx(objective(w, lin.weight.data, h), rel=0.04)
