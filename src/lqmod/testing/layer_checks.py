"""Quantizer contract checks of the LoRA layer over the quantizer and of its allocator options."""

from __future__ import annotations

import pytest
import torch

from lqmod.config import LoRAConfig, validate_config
from lqmod.nn.lora_linear import LoRALinear
from lqmod.quantize import QuantizationError, quantize_weight
from lqmod.testing.comparisons import _bitwise_equal, _prefixed, dense_sized_saved_tensors
from lqmod.testing.quantizer_base import QuantizerContractBase
from lqmod.types import Option, QuantizedWeight, QuantizerSpec


class LayerChecks(QuantizerContractBase):
    """The LoRA layer and allocator options (a part of :class:`~lqmod.testing.QuantizerContract`)."""

    # -- the LoRA layer --------------------------------------------------------------------

    def test_lora_linear_trains(self, spec: QuantizerSpec, qweight: QuantizedWeight) -> None:
        out_f, in_f = self.shape
        # Keep the adapter and the batch smaller than the weight, so that any saved float
        # tensor with out*in elements can only be the dense weight.
        r = max(1, min(4, min(out_f, in_f) // 2))
        tokens = max(1, min(6, out_f // 2))
        lora = LoRAConfig.model_validate({"r": r, "alpha": 2.0 * r})
        gen = torch.Generator().manual_seed(self.seed + 1)
        a0 = torch.randn(r, in_f, generator=gen) / in_f**0.5
        b0 = torch.randn(out_f, r, generator=gen) * 0.1  # non-zero, so lora_A gets a gradient too
        layer = LoRALinear(qweight, spec, lora, lora_a=a0, lora_b=b0).to(self.device)
        stored = {k: v.clone() for k, v in qweight.tensors.items()}

        trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
        assert trainable == {"adapter.lora_A", "adapter.lora_B"}, f"trainable parameters: {sorted(trainable)}"

        x = torch.randn(tokens, in_f, generator=gen).to(self.device).requires_grad_(True)
        y, dense_saved = dense_sized_saved_tensors(layer, x, self.shape)
        assert not dense_saved, f"tensors as large as the dense weight were saved for backward: {dense_saved}"

        # Output and every gradient against a plain dense computation with the same weight.
        w = spec.materialize(qweight, torch.float32).to(self.device)
        xr = x.detach().clone().requires_grad_(True)
        ar = a0.to(self.device).requires_grad_(True)
        br = b0.to(self.device).requires_grad_(True)
        yr = xr @ w.T + lora.scaling * (xr @ ar.T) @ br.T
        torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-5)
        g = torch.randn(y.shape, generator=gen).to(self.device)
        y.backward(g)
        yr.backward(g)
        for got, want, what in ((x.grad, xr.grad, "x"), (layer.lora_A.grad, ar.grad, "lora_A"),
                                (layer.lora_B.grad, br.grad, "lora_B")):  # fmt: skip
            assert got is not None, f"no gradient reached {what}"
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=_prefixed(f"grad {what}"))
        for name, buf in layer.named_buffers():
            assert not buf.requires_grad, f"buffer {name} requires grad"
            assert buf.grad is None, f"buffer {name} received a gradient"

        # A few steps towards a target the adapter can reach: the loss must fall.
        with torch.no_grad():
            target = (
                y.detach() + 0.5 * (x.detach() @ torch.randn(in_f, out_f, generator=gen).to(self.device)) / in_f**0.5
            )
        opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=0.02)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(layer(x.detach()), target)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < 0.7 * losses[0], f"training did not reduce the loss: {losses[0]:.4g} -> {losses[-1]:.4g}"
        for k, v in layer.base.qweight().tensors.items():
            assert _bitwise_equal(v, stored[k].to(v.device)), f"training changed stored tensor {k!r}"

    # -- allocator options -------------------------------------------------------------------

    def test_options_validate(self, spec: QuantizerSpec) -> None:
        opts = list(spec.options())
        labels = []
        for opt in opts:
            assert isinstance(opt, spec.config_model), f"option {opt!r} is not a {spec.config_model.__name__}"
            assert validate_config(spec.config_model, opt.model_dump(), what=spec.name) == opt
            labels.append(Option(spec.name, opt).label)
        duplicates = sorted({lbl for lbl in labels if labels.count(lbl) > 1})
        assert not duplicates, f"options listed twice: {duplicates}"

    def test_options_bits_per_param_is_exact(self, spec: QuantizerSpec) -> None:
        opts = list(spec.options())
        if not opts:
            pytest.skip(f"{spec.name} offers no options")
        weight = self.make_weight()
        stats = self.stats(weight)
        checked = 0
        for opt in opts:
            try:
                predicted = spec.bits_per_param(opt, self.shape)
            except QuantizationError:
                continue  # the option does not fit this shape; an allocator skips it likewise
            actual = quantize_weight(spec, weight, opt, stats).bits_per_param()
            assert predicted == actual, f"{Option(spec.name, opt).label}: predicted {predicted!r}, stored {actual!r}"
            checked += 1
        assert checked, f"no option fits shape {self.shape}; choose a `shape` that some options fit"
