"""DoRA over a quantized base: PEFT's DoRA conventions, float64 gradients, no dense weight saved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lqmod
import lqmod.io as lio
from lqmod.model import iter_lora_layers, quantize_model
from lqmod.nn.lora_linear import LoRALinear
from lqmod.testing import dense_sized_saved_tensors
from lqmod_dora import DoRAAdapter

peft = pytest.importorskip("peft")

OUT, IN, R, ALPHA = 48, 64, 4, 8.0


def _layer(nf_spec: lqmod.QuantizerSpec, *, b_scale: float = 0.1, dropout: float = 0.0) -> LoRALinear:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=g) * 0.05
    qw = lqmod.quantize_weight(nf_spec, w, {"blocksize": 32})
    lora = lqmod.LoRAConfig(r=R, alpha=ALPHA, adapter="dora", dropout=dropout)
    a = torch.randn(R, IN, generator=g) / IN**0.5
    b = torch.randn(OUT, R, generator=g) * b_scale
    return LoRALinear(qw, nf_spec, lora, lora_a=a, lora_b=b, bias=torch.randn(OUT, generator=g) * 0.1)


def _dora(layer: LoRALinear) -> DoRAAdapter:
    assert isinstance(layer.adapter, DoRAAdapter)
    return layer.adapter


class _Dense(nn.Module):
    def __init__(self, layer: LoRALinear) -> None:
        super().__init__()
        self.q = nn.Linear(IN, OUT)
        with torch.no_grad():
            self.q.weight.copy_(layer.dense_weight(torch.float32))
            bias = layer.bias
            assert bias is not None
            self.q.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.q(x)
        return out


def _peft_twin(layer: LoRALinear, dropout: float = 0.0) -> tuple[nn.Module, Any]:
    """PEFT's DoRA (LoraConfig(use_dora=True)) over a dense nn.Linear holding our materialized
    weight, with our A, B and magnitude copied in; returns the model and its LoRA layer."""
    model = peft.get_peft_model(
        _Dense(layer),
        peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["q"], use_dora=True),
    )
    target = model.base_model.model.q
    with torch.no_grad():
        target.lora_A["default"].weight.copy_(layer.lora_A)
        target.lora_B["default"].weight.copy_(layer.lora_B)
        target.lora_magnitude_vector["default"].weight.copy_(_dora(layer).magnitude)
    return model, target


def test_magnitude_starts_where_peft_puts_it(nf_spec: lqmod.QuantizerSpec) -> None:
    # PEFT initialises m = ||W + s B A|| row-wise from the layer's A, B at creation; with a
    # non-zero B (an initializer like lq-lora's) that is not ||W||.
    layer = _layer(nf_spec, b_scale=0.3)
    _, target = _peft_twin(layer)
    dora = target.lora_magnitude_vector["default"]
    dora.update_layer(
        base_layer=target.get_base_layer(), lora_A=target.lora_A["default"].weight,
        lora_B=target.lora_B["default"].weight, scaling=target.scaling["default"],
    )
    torch.testing.assert_close(_dora(layer).magnitude, dora.weight, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(_dora(layer).magnitude, layer.dense_weight().norm(dim=1), rtol=1e-3)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_outputs_and_gradients_match_peft_dora(nf_spec: lqmod.QuantizerSpec, dropout: float) -> None:
    layer = _layer(nf_spec, dropout=dropout)
    with torch.no_grad():  # a trained magnitude, so m / ||W + sBA|| is not 1
        _dora(layer).magnitude.mul_(1 + 0.2 * torch.randn(OUT, generator=torch.Generator().manual_seed(5)))
    model, target = _peft_twin(layer, dropout)
    layer.train()
    model.train()
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(1))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(7)  # the same dropout mask for both: each draws it once, from the same state
    ours = layer(xa)
    torch.manual_seed(7)
    theirs = model(xb)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    g = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2))
    ours.backward(g)
    theirs.backward(g)
    pairs = {
        "x": (xa.grad, xb.grad),
        "lora_A": (layer.lora_A.grad, target.lora_A["default"].weight.grad),
        "lora_B": (layer.lora_B.grad, target.lora_B["default"].weight.grad),
        "magnitude": (_dora(layer).magnitude.grad, target.lora_magnitude_vector["default"].weight.grad),
    }
    for what, (got, want) in pairs.items():
        assert got is not None and want is not None, what
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"grad {what}")


def test_norm_is_detached_from_a_and_b(nf_spec: lqmod.QuantizerSpec) -> None:
    # DoRA section 4.3: the norm receives no gradient. Had it been differentiated, the
    # gradient of A would differ from the pinned-norm one (checked here to be the one we get).
    layer = _layer(nf_spec).double()
    x = torch.randn(6, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    layer(x).pow(2).sum().backward()
    got = layer.lora_A.grad
    assert got is not None
    w = layer.dense_weight(torch.float64)
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b, m, bias = layer.lora_B.detach(), _dora(layer).magnitude.detach(), layer.bias
    assert bias is not None
    directed = w + layer.scaling * b @ a
    live = (m / directed.norm(dim=1))[:, None] * directed
    (x @ live.T + bias.detach()).pow(2).sum().backward()
    assert a.grad is not None
    assert not torch.allclose(got, a.grad, rtol=1e-3), "the norm was differentiated"


def test_gradcheck_float64_over_nf(nf_spec: lqmod.QuantizerSpec) -> None:
    layer = _layer(nf_spec).double()
    x = torch.randn(3, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    names = ["lora_A", "lora_B", "magnitude"]

    def f(xi: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(
            layer, {f"adapter.{n}": v for n, v in zip(names, values, strict=True)}, (xi,)
        )
        return out

    params = [getattr(_dora(layer), n).detach().clone().requires_grad_(True) for n in names]
    # x and m: the norm does not depend on them, so nothing needs pinning.
    assert torch.autograd.gradcheck(lambda xi, m: f(xi, params[0], params[1], m), (x, params[2]))
    # A and B: with the (detached) norm held at its value, the function the backward differentiates.
    with _dora(layer).pinned_detached(layer.base_layer):
        assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_no_dense_weight_is_saved(nf_spec: lqmod.QuantizerSpec, dropout: float) -> None:
    layer = _layer(nf_spec, dropout=dropout).train()
    x = torch.randn(4, IN, requires_grad=True)
    y, saved = dense_sized_saved_tensors(layer, x, (OUT, IN))
    assert not saved, saved
    y.sum().backward()
    assert _dora(layer).magnitude.grad is not None


def test_row_norms_survive_a_bfloat16_cast(nf_spec: lqmod.QuantizerSpec) -> None:
    layer = _layer(nf_spec).to(torch.bfloat16)
    assert _dora(layer).weight_sq.dtype == torch.float64


def test_peft_loads_the_exported_dora_adapter(tiny_llama: nn.Module, tmp_path: Path) -> None:
    model = tiny_llama
    quantize_model(model, "nf", {"blocksize": 32}, lora={"r": 4, "adapter": "dora"}, progress=False)
    g = torch.Generator().manual_seed(1)
    for _, layer in iter_lora_layers(model):
        layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
        _dora(layer).magnitude.data.mul_(1 + 0.1 * torch.randn(layer.out_features, generator=g))
    ids = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
    lio.export_peft(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["peft_type"] == "LORA"
    with_peft = peft.PeftModel.from_pretrained(lio.dequantized_copy(model), str(tmp_path / "adapter"))
    with torch.no_grad():
        theirs = with_peft(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_norm_is_full_precision_under_bf16_autocast(nf_spec: lqmod.QuantizerSpec) -> None:
    layer = _layer(nf_spec, b_scale=0.3)
    exact = layer.dense_weight(torch.float64) + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norm = _dora(layer).weight_norm(layer.base_layer)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), exact.norm(dim=1), rtol=1e-5, atol=0)
