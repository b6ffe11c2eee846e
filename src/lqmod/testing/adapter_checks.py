"""The adapter contract's checks of registration, config, values and gradients, training and bfloat16."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from lqmod.config import AdapterConfig, ConfigError, validate_config
from lqmod.nn.adapter import Adapter
from lqmod.nn.lora_linear import LoRALinear
from lqmod.testing.adapter_base import AdapterContractBase
from lqmod.testing.adapter_quantizer import _materialize, contract_quantizer_spec
from lqmod.testing.contract import dense_sized_saved_tensors
from lqmod.types import AdapterSpec


class AdapterValueChecks(AdapterContractBase):
    """Registration and config, step 0, values and gradients against ``merged_weight``, memory,
    training and bfloat16."""

    # -- registration and config ---------------------------------------------------------

    def test_spec_is_well_formed(self, spec: AdapterSpec) -> None:
        assert spec.name == self.adapter
        assert isinstance(spec.config_model, type) and issubclass(spec.config_model, AdapterConfig), (
            f"config_model {spec.config_model!r} must subclass lqmod.config.AdapterConfig"
        )
        assert callable(spec.build), "spec.build is not callable"
        for attr in ("check", "validate"):
            value = getattr(spec, attr)
            assert value is None or callable(value), f"spec.{attr} must be None or callable"
        if spec.peft is not None:
            assert isinstance(dict(spec.peft.config), dict) and callable(spec.peft.tensors)
        assert spec.description, "give the variant a one-line description (lqmod plugins shows it)"

    def test_config_is_frozen_and_forbids_extras(self, spec: AdapterSpec, config: dict[str, Any]) -> None:
        cfg = validate_config(spec.config_model, config, what=f"{spec.name} adapter config")
        with pytest.raises((ValidationError, TypeError, AttributeError)):
            cfg.version = cfg.version + 1
        hash(cfg)
        qweight, _ = self.make_weight()
        with pytest.raises(ConfigError, match="no_such_field"):
            LoRALinear(
                qweight, contract_quantizer_spec(), self.lora_config({**config, "no_such_field": 1}),
                lora_a=torch.zeros(self.rank, self.shape[1]), lora_b=torch.zeros(self.shape[0], self.rank),
                adapter=spec,
            )

    def test_layer_holds_the_variant(self, spec: AdapterSpec, config: dict[str, Any]) -> None:
        layer = self.make_layer(spec, config)
        assert isinstance(layer.adapter, Adapter), f"build returned a {type(layer.adapter).__name__}"
        assert layer.adapter_name == spec.name
        assert tuple(layer.lora_A.shape) == (self.rank, self.shape[1])
        assert tuple(layer.lora_B.shape) == (self.shape[0], self.rank)
        assert not any(n.startswith("base_layer.") for n, p in layer.named_parameters() if p.requires_grad), (
            "the base must stay frozen"
        )
        assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
            f"adapter.{n}" for n, _ in layer.adapter.named_parameters()
        }, "every adapter parameter, and only those, must train"

    # -- values and gradients ------------------------------------------------------------

    def test_step_zero_with_zero_b_equals_the_base(self, spec: AdapterSpec, config: dict[str, Any]) -> None:
        if not self.starts_as_the_base(config):
            pytest.skip(f"{spec.name} with {config} does not start as its base (starts_as_the_base)")
        layer = self.make_layer(spec, config, zero_b=True, trained=False)
        x = self.make_input()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=1e-5, atol=1e-6)

    def test_disabled_adapter_is_the_base(self, spec: AdapterSpec, config: dict[str, Any]) -> None:
        layer = self.make_layer(spec, config)
        layer.adapters_enabled = False
        x = self.make_input()
        with torch.no_grad():
            assert torch.equal(layer(x), layer.base_layer(x))

    def test_forward_and_gradients_match_merged_weight_in_float64(
        self, spec: AdapterSpec, config: dict[str, Any]
    ) -> None:
        layer = self.make_layer(spec, config).double()
        x = self.make_input(torch.float64).requires_grad_(True)
        y = layer(x)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        y.backward(g)
        got = {n: p.grad.clone() for n, p in layer.adapter.named_parameters() if p.grad is not None}
        assert x.grad is not None
        grad_x = x.grad.clone()
        assert set(got) == {n for n, _ in layer.adapter.named_parameters()}, "some adapter parameter got no gradient"

        layer.zero_grad()
        xr = x.detach().clone().requires_grad_(True)
        w = _materialize(layer.qweight, torch.float64)
        bias = layer.bias
        assert bias is not None
        yr = xr @ layer.adapter.merged_weight(w).T + bias.detach()
        torch.testing.assert_close(y, yr, rtol=1e-9, atol=1e-11, msg=lambda m: f"output vs merged_weight: {m}")
        yr.backward(g)
        assert xr.grad is not None
        torch.testing.assert_close(grad_x, xr.grad, rtol=1e-9, atol=1e-11, msg=lambda m: f"grad x: {m}")
        for n, p in layer.adapter.named_parameters():
            assert p.grad is not None, f"merged_weight gives no gradient to {n}"
            torch.testing.assert_close(got[n], p.grad, rtol=1e-8, atol=1e-11, msg=f"grad {n} vs merged_weight")

    def _gradcheck(self, layer: LoRALinear, x: torch.Tensor, names: Sequence[str]) -> None:
        params = dict(layer.named_parameters())
        inputs = [params[f"adapter.{n}"].detach().clone().requires_grad_(True) for n in names]

        def f(xi: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
            subs = {f"adapter.{n}": v for n, v in zip(names, values, strict=True)}
            out: torch.Tensor = torch.func.functional_call(layer, subs, (xi,))
            return out

        assert torch.autograd.gradcheck(f, (x, *inputs), eps=1e-6, atol=1e-7, rtol=1e-5)

    def test_gradcheck_in_float64(self, spec: AdapterSpec, config: dict[str, Any]) -> None:
        layer = self.make_layer(spec, config).double()
        x = self.make_input(torch.float64).requires_grad_(True)
        names = [n for n, _ in layer.adapter.named_parameters()]
        detached = layer.adapter.detached_params
        assert detached <= set(names), f"detached_params {sorted(detached)} are not parameters {names}"
        self._gradcheck(layer, x, [n for n in names if n not in detached])
        with layer.adapter.pinned_detached(layer.base_layer):
            self._gradcheck(layer, x, names)

    @pytest.mark.parametrize("dropout", [0.0, 0.1])
    def test_no_dense_weight_is_saved_for_backward(
        self, spec: AdapterSpec, config: dict[str, Any], dropout: float
    ) -> None:
        layer = self.make_layer(spec, config, dropout=dropout).train()
        x = self.make_input().requires_grad_(True)
        y, saved = dense_sized_saved_tensors(layer, x, self.shape)
        assert not saved, f"tensors as large as the dense weight were saved for backward: {saved}"
        y.sum().backward()
        assert x.grad is not None and layer.lora_A.grad is not None

    def test_trains_without_touching_the_base(self, spec: AdapterSpec, config: dict[str, Any]) -> None:
        layer = self.make_layer(spec, config)
        stored = {k: v.clone() for k, v in layer.qweight.tensors.items()}
        bias = layer.bias
        assert bias is not None
        bias0 = bias.detach().clone()
        gen = torch.Generator().manual_seed(self.seed + 5)
        x = torch.randn(16, self.shape[1], generator=gen)
        with torch.no_grad():
            shift = torch.randn(self.shape[1], self.shape[0], generator=gen) / self.shape[1] ** 0.5
            target = layer(x) + 0.3 * x @ shift
        opt = torch.optim.Adam(layer.adapter.parameters(), lr=0.02)
        losses = []
        for _ in range(40):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(layer(x), target)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < 0.7 * losses[0], f"training did not reduce the loss: {losses[0]:.4g} -> {losses[-1]:.4g}"
        for k, v in layer.qweight.tensors.items():
            assert torch.equal(v, stored[k]), f"training changed stored tensor {k!r}"
        assert torch.equal(bias.detach(), bias0), "the bias trained although train_bias is off"

    def test_bfloat16_cast_runs_close_to_float32(self, spec: AdapterSpec, config: dict[str, Any]) -> None:
        layer = self.make_layer(spec, config)
        x = self.make_input()
        with torch.no_grad():
            ref = layer(x)
            low = copy.deepcopy(layer).to(torch.bfloat16)
            for k, v in low.qweight.tensors.items():
                assert v.dtype == layer.qweight.tensors[k].dtype, f"a dtype cast changed quantized tensor {k!r}"
            out = low(x.to(torch.bfloat16)).float()
        assert bool(torch.isfinite(out).all())
        err = float((out - ref).norm() / ref.norm())
        assert err < 0.03, f"bfloat16 output is {err:.3g} (relative) away from float32"
