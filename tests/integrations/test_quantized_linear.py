"""QuantizedLinear on its own: forward/backward against float64, dtype casts, the dense views."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lqmod
from lqmod.nn import QuantizedLinear


@pytest.fixture
def layer() -> QuantizedLinear:
    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    return QuantizedLinear.from_linear(lin, lqmod.get_registry().quantizer("nf"), {"bits": 4, "blocksize": 64})


def test_forward_and_input_gradient_match_float64(layer: QuantizedLinear) -> None:
    w = layer.dequantize(torch.float64)
    assert layer.bias is not None
    b = layer.bias.detach().double()
    x = torch.randn(3, 7, 128, dtype=torch.float32, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    x64 = x.detach().double()
    torch.testing.assert_close(y.double(), x64 @ w.T + b, rtol=1e-5, atol=1e-5)
    assert x.grad is not None
    torch.testing.assert_close(x.grad.double(), g.double() @ w, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())


def test_dtype_casts_leave_the_quantized_tensors_alone(layer: QuantizedLinear) -> None:
    tensors = {n: t.clone() for n, t in layer.qweight.tensors.items()}
    assert layer.bias is not None
    w32 = layer.dequantize(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    for name, t in layer.qweight.tensors.items():
        assert t.dtype == tensors[name].dtype and torch.equal(t, tensors[name]), name
    assert layer.weight.dtype == torch.bfloat16
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    ref = x.float() @ w32.T + layer.bias.float()
    assert (layer(x).float() - ref).abs().max() < 0.05 * ref.abs().max()
    layer.float()
    assert layer.compute_dtype == torch.float32
    torch.testing.assert_close(layer.dequantize(torch.float32), w32, rtol=0, atol=0)


def test_to_dense_and_requantize(layer: QuantizedLinear) -> None:
    dense = layer.to_dense(torch.float32)
    assert isinstance(dense, nn.Linear)
    x = torch.randn(4, 128)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-6, atol=1e-6)
    w = layer.dequantize(torch.float32)
    again = layer.requantize(w)
    assert again.quantizer == "nf" and again.qweight.config == layer.qweight.config
    # NF4 of an NF4 weight is nearly itself: the codes round to themselves, only the
    # double-quantized block scales move (NF4's own error on a Gaussian weight is ~0.09).
    rel = (again.dequantize(torch.float32) - w).norm() / w.norm()
    assert float(rel) < 1e-3


def test_bad_input_is_named(layer: QuantizedLinear) -> None:
    with pytest.raises(ValueError, match="input has 64 features, layer expects 128"):
        layer(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(48,\)"):
        QuantizedLinear(layer.qweight, layer.spec, torch.zeros(3))
