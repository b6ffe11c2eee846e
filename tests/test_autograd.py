"""The materializing LoRA layer: what autograd saves, and gradients against float64."""

from __future__ import annotations

import pytest
import torch

import lqmod
from lqmod.nn import LoRALinear


def _layer(spec: lqmod.QuantizerSpec, *, save_dense: bool = False, bias: bool = True) -> LoRALinear:
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    qw = lqmod.quantize_weight(spec, w, {"blocksize": 64})
    lora = lqmod.LoRAConfig(r=4, alpha=8, materialize_in_backward=not save_dense)
    return LoRALinear(
        qw, spec, lora, lora_a=torch.randn(4, 128) * 0.1, lora_b=torch.randn(96, 4) * 0.1,
        bias=torch.randn(96) if bias else None,
    )


def _saved_shapes(layer: LoRALinear, x: torch.Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return saved


def test_dense_weight_is_never_saved_for_backward(nf_spec: lqmod.QuantizerSpec) -> None:
    layer = _layer(nf_spec)
    saved = _saved_shapes(layer, torch.randn(5, 128, requires_grad=True))
    dense = [(s, d) for s, d in saved if s in ((96, 128), (128, 96)) and d.is_floating_point]
    assert dense == []
    # Only the quantized tensors (uint8 codes, small scales) and adapter activations remain.
    assert sum(1 for _, d in saved if d == torch.uint8) >= 1


def test_saved_tensor_check_detects_the_qlora_style_baseline(nf_spec: lqmod.QuantizerSpec) -> None:
    # The same check must fail when the dense weight *is* kept, or it proves nothing.
    layer = _layer(nf_spec, save_dense=True)
    saved = _saved_shapes(layer, torch.randn(5, 128, requires_grad=True))
    assert any(s in ((96, 128), (128, 96)) and d == torch.float32 for s, d in saved)


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_float64_dense_reference(nf_spec: lqmod.QuantizerSpec, bias: bool) -> None:
    layer = _layer(nf_spec, bias=bias)
    layer.bias is None or layer.bias.requires_grad_(True)
    x = torch.randn(3, 7, 128, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)

    w64 = layer.dense_weight(torch.float64)
    x64 = x.detach().double().requires_grad_(True)
    a64 = layer.lora_A.detach().double().requires_grad_(True)
    b64 = layer.lora_B.detach().double().requires_grad_(True)
    bias64 = None if layer.bias is None else layer.bias.detach().double().requires_grad_(True)
    y64 = x64 @ w64.T + layer.scaling * (x64 @ a64.T) @ b64.T
    if bias64 is not None:
        y64 = y64 + bias64
    y64.backward(g.double())

    def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
        err = (ours.double() - ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.abs().max().item()), err

    close(y.detach(), y64.detach())
    assert x.grad is not None and layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert x64.grad is not None and a64.grad is not None and b64.grad is not None
    close(x.grad, x64.grad)
    close(layer.lora_A.grad, a64.grad)
    close(layer.lora_B.grad, b64.grad)
    if bias64 is not None:
        assert layer.bias is not None and layer.bias.grad is not None and bias64.grad is not None
        close(layer.bias.grad, bias64.grad)


def test_base_weight_gets_no_gradient_and_only_adapters_train(nf_spec: lqmod.QuantizerSpec) -> None:
    layer = _layer(nf_spec)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"adapter.lora_A", "adapter.lora_B"}
    assert all(not b.requires_grad for b in layer.buffers())


def test_gradcheck_in_float64(nf_spec: lqmod.QuantizerSpec) -> None:
    torch.manual_seed(1)
    qw = lqmod.quantize_weight(nf_spec, torch.randn(8, 64), {"blocksize": 32})
    lora = lqmod.LoRAConfig(r=2, alpha=2)
    layer = LoRALinear(qw, nf_spec, lora, lora_a=torch.randn(2, 64, dtype=torch.float64),
                       lora_b=torch.randn(8, 2, dtype=torch.float64))
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_bf16_input_runs_and_returns_bf16(nf_spec: lqmod.QuantizerSpec) -> None:
    layer = _layer(nf_spec)
    x = torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def test_wrong_adapter_shapes_are_refused(nf_spec: lqmod.QuantizerSpec) -> None:
    qw = lqmod.quantize_weight(nf_spec, torch.randn(16, 64), {"blocksize": 32})
    with pytest.raises(ValueError, match="expected A\\(4, 64\\) and B\\(16, 4\\)"):
        LoRALinear(qw, nf_spec, lqmod.LoRAConfig(r=4), lora_a=torch.zeros(4, 16), lora_b=torch.zeros(16, 4))
