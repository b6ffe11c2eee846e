"""NF4 against bitsandbytes, the trusted implementation (bit-exact on CPU)."""

from __future__ import annotations

import pytest
import torch

import lqmod
from lqmod.quantize import QuantizationError
from lqmod_nf.codebooks import NF4_TABLE, dynamic_map, nf_table, normal_float_table

bnbf = pytest.importorskip("bitsandbytes.functional")


def _ours(spec: lqmod.QuantizerSpec, w: torch.Tensor, **cfg: object) -> lqmod.QuantizedWeight:
    return lqmod.quantize_weight(spec, w, {"bits": 4, **cfg})


@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("shape", [(256, 512), (96, 1536)])
def test_codes_and_absmax_bit_exact(nf_spec: lqmod.QuantizerSpec, blocksize: int, shape: tuple[int, int]) -> None:
    torch.manual_seed(blocksize)
    w = torch.randn(*shape) * 0.02
    qw = _ours(nf_spec, w, blocksize=blocksize, double_quant=False)
    q, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(qw.tensors["codes"], q.flatten())
    assert torch.equal(qw.tensors["absmax"], state.absmax)
    assert torch.equal(nf_spec.materialize(qw, torch.float32), bnbf.dequantize_4bit(q, state))


def test_bit_exact_on_real_minilm_weights(nf_spec: lqmod.QuantizerSpec, minilm_dir: str) -> None:
    from safetensors.torch import load_file

    weights = load_file(f"{minilm_dir}/model.safetensors")
    names = [n for n in weights if n.endswith("dense.weight") or n.endswith("query.weight")][:6]
    assert names
    for name in names:
        w = weights[name]
        qw = _ours(nf_spec, w, blocksize=64, double_quant=False)
        q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        assert torch.equal(qw.tensors["codes"], q.flatten()), name
        assert torch.equal(qw.tensors["absmax"], state.absmax), name


@pytest.mark.slow
def test_gaussian_4096_error_equals_bitsandbytes(nf_spec: lqmod.QuantizerSpec) -> None:
    torch.manual_seed(0)
    w = torch.randn(4096, 4096)
    qw = _ours(nf_spec, w, blocksize=64, double_quant=False)
    ours = ((nf_spec.materialize(qw, torch.float32) - w).norm() / w.norm()).item()
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    theirs = ((bnbf.dequantize_4bit(q, state) - w).norm() / w.norm()).item()
    assert ours == theirs
    assert ours == pytest.approx(0.0920, abs=5e-4)
    assert qw.bits_per_param() == 4.5


def test_double_quant_matches_bitsandbytes_where_its_search_is_exact(nf_spec: lqmod.QuantizerSpec) -> None:
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    qw = _ours(nf_spec, w, blocksize=64, double_quant=True)
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    # 4-bit codes depend on the float absmax only: bit-exact.
    assert torch.equal(qw.tensors["codes"], q.flatten())
    assert torch.equal(qw.tensors["absmax_scale"], state.state2.absmax)
    assert torch.equal(qw.tensors["absmax_offset"], state.offset.reshape(1))
    # 8-bit absmax codes: ours are the exact nearest code; bitsandbytes' CPU binary search
    # (BinSearch Direct2) occasionally returns the farther neighbour.
    absmax = w.reshape(-1, 64).abs().max(1).values
    scaled = ((absmax - absmax.mean()).reshape(-1, 256) / state.state2.absmax[:, None]).flatten()
    table = dynamic_map()
    ours, theirs = qw.tensors["absmax_codes"].long(), state.absmax.long()
    dist = lambda codes: (scaled - table[codes]).abs()  # noqa: E731
    assert torch.all(dist(ours) <= dist(theirs))
    assert (ours != theirs).float().mean() < 0.005
    cfg = nf_spec.config_model.model_validate({"blocksize": 64})
    assert qw.bits_per_param() == nf_spec.bits_per_param(cfg, (1024, 1024))


def test_tables() -> None:
    assert torch.equal(nf_table(4), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.allclose(normal_float_table(4).float(), torch.tensor(NF4_TABLE), atol=2e-7)
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map(signed=True))
    for bits in (2, 3):
        t = nf_table(bits)
        assert t.numel() == 2**bits and t[0] == -1 and t[-1] == 1 and (t == 0).sum() == 1
        assert torch.all(t[1:] > t[:-1])


def test_fewer_bits_more_error(nf_spec: lqmod.QuantizerSpec) -> None:
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    errs = []
    for bits in (2, 3, 4):
        qw = lqmod.quantize_weight(nf_spec, w, {"bits": bits, "blocksize": 64})
        errs.append(((nf_spec.materialize(qw, torch.float32) - w).norm() / w.norm()).item())
    assert errs[0] > errs[1] > errs[2]


def test_block_size_that_does_not_fit_is_refused(nf_spec: lqmod.QuantizerSpec) -> None:
    with pytest.raises(QuantizationError, match=r"in_features=96 is not a multiple of blocksize=64.*\[16, 32\]"):
        lqmod.quantize_weight(nf_spec, torch.randn(8, 96), {"blocksize": 64})
