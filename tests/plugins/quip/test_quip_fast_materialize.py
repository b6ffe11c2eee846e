"""QuIP#-like materialize: fast Walsh-Hadamard in place, float32 work, against the dense float64 formula."""

from __future__ import annotations

import pytest
import torch

import lqmod
from lqmod.packing import unpack_codes
from lqmod.types import LayerStats, QuantizedWeight
from lqmod_quip.hadamard import fwht_, sylvester, transform
from lqmod_quip.quantizer import _from_transformed, _grids, _transforms


@pytest.mark.parametrize("q", [1, 2, 8, 64])
def test_fwht_is_the_sylvester_matrix(q: int) -> None:
    x = torch.randn(3, q, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(q))
    expected = torch.einsum("ij,pjk->pik", sylvester(q), x)
    assert torch.allclose(fwht_(x.clone()), expected, atol=1e-12)
    with pytest.raises(ValueError, match="power of two, got 12"):
        fwht_(torch.zeros(1, 12, 1))


@pytest.mark.parametrize("order", [16, 24, 72, 56])  # sylvester, paley I/II, random odd factor
@pytest.mark.parametrize("dim", [0, 1])
def test_inverse_along_matches_dense_inverse(order: int, dim: int) -> None:
    tr = transform(order)
    x = torch.randn(order, order, dtype=torch.float64, generator=torch.Generator().manual_seed(order))
    dense = tr.inverse(x) if dim == 1 else tr.inverse(x.T).T
    norm = tr.walsh_norm
    assert torch.allclose(tr.inverse_along(x.clone(), dim) * norm, dense, atol=1e-12)


def _dense_reference(qweight: QuantizedWeight) -> torch.Tensor:
    """The formula as first written: float64 gathers and dense Kronecker matmuls."""
    m, n = qweight.shape
    t = qweight.tensors
    sc = t["scales"].double()
    codes = t["codes"].long() & 0xFFFF
    grid, grid1 = _grids(codes.device)
    wt = grid[codes[0]].reshape(m, n) * sc[0]
    if qweight.config["bits"] == 3:
        wt = wt + grid1[t["resid_codes"].long()].reshape(m, n) * sc[1]
    elif qweight.config["bits"] == 4:
        wt = wt + grid[codes[1]].reshape(m, n) * sc[1]
    signs = 1.0 - 2.0 * unpack_codes(t["signs"], 1, m + n).double()
    tm, tn = _transforms(m, n, int(qweight.config["seed"]), codes.device)
    return _from_transformed(wt, signs[:m], signs[m:], tm, tn)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_materialize_matches_the_dense_float64_formula(bits: int) -> None:
    spec = lqmod.get_registry().quantizer("quip")
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 96, generator=gen)
    x = torch.randn(128, 96, generator=gen, dtype=torch.float64)
    qw = spec.quantize(w, spec.config_model.model_validate({"bits": bits}), LayerStats(hessian=x.T @ x, n_tokens=128))
    ref = _dense_reference(qw)
    assert torch.allclose(spec.materialize(qw, torch.float64), ref, rtol=0, atol=1e-12)
    for dtype in (torch.float32, torch.bfloat16):
        got = spec.materialize(qw, dtype)
        assert got.dtype == dtype
        # The rule of the kernel tests: within 2x the error of casting the exact result.
        cast_err = (ref.to(dtype).double() - ref).abs().max().item()
        err = (got.double() - ref).abs().max().item()
        assert err <= 2 * cast_err + 1e-6 * ref.abs().max().item(), (dtype, err, cast_err)
