"""IR-QLoRA's IEC over a quantized base: the paper's paths, float64 gradients, rank refusal, no PEFT form."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lqmod
import lqmod.io as lio
from lqmod.model import iter_lora_layers, quantize_model
from lqmod.nn.lora_linear import LoRALinear
from lqmod.testing import dense_sized_saved_tensors
from lqmod_iec import IECAdapter

OUT, IN, R, ALPHA = 48, 64, 4, 8.0


def _layer(nf_spec: lqmod.QuantizerSpec, *, dropout: float = 0.0, r: int = R) -> LoRALinear:
    g = torch.Generator().manual_seed(0)
    qw = lqmod.quantize_weight(nf_spec, torch.randn(OUT, IN, generator=g) * 0.05, {"blocksize": 32})
    lora = lqmod.LoRAConfig(r=r, alpha=ALPHA, adapter="iec", dropout=dropout)
    layer = LoRALinear(
        qw, nf_spec, lora, lora_a=torch.randn(r, IN, generator=g) / IN**0.5,
        lora_b=torch.randn(OUT, r, generator=g) * 0.1, bias=torch.randn(OUT, generator=g) * 0.1,
    )
    with torch.no_grad():  # trained elastic scalars (they start at 0, where the paths vanish)
        _iec(layer).beta_A.fill_(0.7)
        _iec(layer).beta_B.fill_(-0.4)
    return layer


def _iec(layer: LoRALinear) -> IECAdapter:
    assert isinstance(layer.adapter, IECAdapter)
    return layer.adapter


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               beta_a: torch.Tensor, beta_b: torch.Tensor, s: float) -> torch.Tensor:
    """IEC spelled the way the IR-QLoRA reference code spells it (reshape/mean, unsqueeze/reshape)."""
    r = a.shape[0]
    h = x @ a.T + beta_a * x.reshape(*x.shape[:-1], r, -1).mean(dim=-1)
    u = ((h @ b.T).reshape(*h.shape, -1) + beta_b * h.unsqueeze(-1)).reshape(*h.shape[:-1], -1)
    return x @ w.T + bias + s * u


def test_matches_the_reference_spelling_in_value_and_gradient(nf_spec: lqmod.QuantizerSpec) -> None:
    layer = _layer(nf_spec).double()
    x = torch.randn(2, 3, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = layer(x)
    ad = _iec(layer)
    leaves = [t.detach().clone().requires_grad_(True) for t in (ad.lora_A, ad.lora_B, ad.beta_A, ad.beta_B)]
    a, b, beta_a, beta_b = leaves
    xr = x.detach().clone().requires_grad_(True)
    bias = layer.bias
    assert bias is not None
    yr = _reference(xr, layer.dense_weight(torch.float64), bias.detach(), a, b, beta_a, beta_b, layer.scaling)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y.backward(g)
    yr.backward(g)
    for got, want, what in zip(
        (x.grad, ad.lora_A.grad, ad.lora_B.grad, ad.beta_A.grad, ad.beta_B.grad),
        (xr.grad, *(t.grad for t in leaves)),
        ("x", "lora_A", "lora_B", "beta_A", "beta_B"),
        strict=True,
    ):
        assert got is not None and want is not None, what
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"grad {what}")
        assert bool(got.abs().sum() > 0), f"no gradient reached {what}"


def test_paths_are_group_means_and_repeats(nf_spec: lqmod.QuantizerSpec) -> None:
    mean, repeat = _iec(_layer(nf_spec)).paths()
    x = torch.arange(IN, dtype=torch.float32)
    torch.testing.assert_close(mean @ x, x.reshape(R, IN // R).mean(dim=1))
    h = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(repeat @ h, h.repeat_interleave(OUT // R))
    assert tuple(mean.shape) == (R, IN) and tuple(repeat.shape) == (OUT, R)


def test_starts_as_lora(nf_spec: lqmod.QuantizerSpec) -> None:
    # beta_A = beta_B = 0 at creation (the authors' init): exactly LoRA's output.
    g = torch.Generator().manual_seed(0)
    qw = lqmod.quantize_weight(nf_spec, torch.randn(OUT, IN, generator=g) * 0.05, {"blocksize": 32})
    a, b = torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g)
    iec = LoRALinear(qw, nf_spec, lqmod.LoRAConfig(r=R, alpha=ALPHA, adapter="iec"), lora_a=a, lora_b=b)
    lora = LoRALinear(qw, nf_spec, lqmod.LoRAConfig(r=R, alpha=ALPHA), lora_a=a, lora_b=b)
    x = torch.randn(5, IN, generator=g)
    with torch.no_grad():
        assert torch.equal(iec(x), lora(x))


def test_gradcheck_float64_over_nf(nf_spec: lqmod.QuantizerSpec) -> None:
    layer = _layer(nf_spec).double()
    x = torch.randn(3, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    names = ["lora_A", "lora_B", "beta_A", "beta_B"]
    params = [getattr(_iec(layer), n).detach().clone().requires_grad_(True) for n in names]

    def f(xi: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(
            layer, {f"adapter.{n}": v for n, v in zip(names, values, strict=True)}, (xi,)
        )
        return out

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_no_dense_weight_is_saved(nf_spec: lqmod.QuantizerSpec, dropout: float) -> None:
    layer = _layer(nf_spec, dropout=dropout).train()
    x = torch.randn(4, IN, requires_grad=True)
    y, saved = dense_sized_saved_tensors(layer, x, (OUT, IN))
    assert not saved, saved
    y.sum().backward()
    assert _iec(layer).beta_A.grad is not None and _iec(layer).beta_B.grad is not None


def test_a_rank_that_does_not_divide_the_layer_is_refused(nf_spec: lqmod.QuantizerSpec) -> None:
    with pytest.raises(ValueError, match=r"rank r=5 does not divide in_features=64 and out_features=48.*fit"):
        _layer(nf_spec, r=5)


def test_quantize_model_refuses_the_rank_before_touching_the_model(tiny_llama: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"layer '.*': iec adapter: rank r=3 does not divide in_features=64"):
        quantize_model(tiny_llama, "nf", {"blocksize": 32}, lora={"r": 3, "adapter": "iec"}, progress=False)
    assert not list(iter_lora_layers(tiny_llama))


def test_peft_export_is_refused_in_one_line(tiny_llama: nn.Module, tmp_path: Path) -> None:
    quantize_model(tiny_llama, "nf", {"blocksize": 32}, lora={"r": 4, "adapter": "iec"}, progress=False)
    with pytest.raises(ValueError, match=r"^PEFT cannot load the 'iec' adapter variant; PEFT loads dora, lora\. "
                                         r"Save an lqmod checkpoint") as info:
        lio.export_peft(tiny_llama, tmp_path / "adapter")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "adapter").exists()
