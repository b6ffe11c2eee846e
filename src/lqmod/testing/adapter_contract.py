"""The adapter contract: what every adapter variant plug-in must guarantee, as pytest tests.

A variant's author subclasses :class:`AdapterContract` in their own test suite::

    from lqmod.testing import AdapterContract

    class TestMyAdapterContract(AdapterContract):
        adapter = "mine"                       # the registered name
        configs = [{}, {"my_option": 2}]       # its adapter_config values to check

The base is the suite's own small quantizer (4-bit integers, one scale per row, defined
here, so the suite names no plug-in) with a bias; every check runs over it:

* registration: spec fields, config frozen and typo-proof through ``LoRAConfig.adapter_config``;
* step 0: with ``B = 0`` the adapted layer computes what its base computes;
* consistency: in float64, output and every gradient (input and each adapter parameter)
  equal those of ``x @ merged_weight(W).T + b``, the variant's own dense equivalent;
* ``torch.autograd.gradcheck`` in float64 over the input and every adapter parameter
  (those in ``Adapter.detached_params`` inside ``Adapter.pinned_detached``, plus a check of
  the others with nothing pinned);
* memory: no tensor as large as the dense weight is saved for backward, with and without dropout;
* training: only the adapter trains, the quantized tensors never change, the loss falls;
* state: a fresh layer loading the state dict computes bit-identical outputs, ``validate``
  accepts it and refuses a non-finite one; a checkpoint records the variant and reloads it;
* PEFT: a variant with a ``PeftForm`` exports an adapter that PEFT applies to the dense copy
  with the same outputs; one without is refused by :func:`lqmod.io.export_peft` with a message
  naming the variants PEFT loads;
* bfloat16: ``layer.to(torch.bfloat16)`` runs and stays close to float32.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import lqmod
from lqmod.config import AdapterConfig, ConfigError, LoRAConfig, QuantizerConfig, validate_config
from lqmod.nn.adapter import Adapter
from lqmod.nn.lora_linear import LoRALinear
from lqmod.plugins import Registry
from lqmod.testing.contract import dense_sized_saved_tensors
from lqmod.types import AdapterSpec, QuantizedWeight, QuantizerSpec, check_tensor_layout

__all__ = ["CONTRACT_QUANTIZER", "AdapterContract", "contract_quantizer_spec"]

#: The suite's own base quantizer (registered only in the registries the suite builds).
CONTRACT_QUANTIZER = "adapter-contract-int4"


class _Int4Config(QuantizerConfig):
    pass


def _quantize(w: torch.Tensor, cfg: _Int4Config, stats: Any) -> QuantizedWeight:
    w = w.detach().double()
    scale = (w.abs().amax(dim=1, keepdim=True) / 7).clamp_min(1e-12)
    codes = torch.clamp(torch.round(w / scale), -8, 7).to(torch.int8)  # one byte per code: honest cost
    return QuantizedWeight(
        CONTRACT_QUANTIZER, cfg.model_dump(), (int(w.shape[0]), int(w.shape[1])),
        {"codes": codes, "scale": scale.float()},
    )


def _materialize(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    return qw.tensors["codes"].to(dtype) * qw.tensors["scale"].to(dtype)


def _validate(qw: QuantizedWeight, cfg: _Int4Config) -> None:
    out_f, in_f = qw.shape
    check_tensor_layout(qw, {"codes": ((out_f, in_f), torch.int8), "scale": ((out_f, 1), torch.float32)})


def contract_quantizer_spec() -> QuantizerSpec:
    """The 4-bit row-absmax integer quantizer the adapter contract builds its bases with."""
    return QuantizerSpec(
        CONTRACT_QUANTIZER, _Int4Config, _quantize, _materialize,
        bits_per_param=lambda cfg, shape: 8 + 32 / shape[1], validate=_validate,
        description="the adapter contract's own base (4-bit integers, one scale per row)",
    )


class _SuitePlugin:
    """Registers the suite's quantizer (and the variant under test when it has no entry point)."""

    def __init__(self, adapter: AdapterSpec | None) -> None:
        self._adapter = adapter

    @lqmod.hookimpl
    def lqmod_quantizers(self) -> Iterator[QuantizerSpec]:
        yield contract_quantizer_spec()

    @lqmod.hookimpl
    def lqmod_adapters(self) -> Iterator[AdapterSpec]:
        if self._adapter is not None:
            yield self._adapter


def _config_id(config: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(config.items())) or "defaults"


class AdapterContract:
    """Subclass in a ``Test*`` class and set :attr:`adapter` (and, if it has options, :attr:`configs`)."""

    #: The registered adapter variant's name.
    adapter: ClassVar[str] = ""
    #: ``adapter_config`` values every config-dependent check runs with.
    configs: ClassVar[Sequence[Mapping[str, Any]]] = ({},)
    #: (out_features, in_features) of the test layer; ``rank`` should divide both (IEC needs it).
    shape: ClassVar[tuple[int, int]] = (24, 32)
    rank: ClassVar[int] = 4
    alpha: ClassVar[float] = 8.0
    #: Tokens per test batch; kept below out * in / in_features so only a dense weight is dense-sized.
    tokens: ClassVar[int] = 3
    seed: ClassVar[int] = 0

    # -- what a subclass may override --------------------------------------------------

    def get_spec(self) -> AdapterSpec:
        """The spec under test; by default looked up in the (entry-point built) registry."""
        return lqmod.get_registry().adapter(self.adapter)

    def make_registry(self, spec: AdapterSpec) -> Registry:
        """A registry holding the suite's quantizer and ``spec`` (for checkpoint round trips)."""
        registry = Registry()
        own = spec.name not in registry.adapters()
        registry.register(_SuitePlugin(spec if own else None), name="lqmod-adapter-contract")
        return registry

    def starts_as_the_base(self, config: Mapping[str, Any]) -> bool:
        """Whether, with ``B = 0``, the freshly built adapter computes exactly its base (true of
        LoRA, DoRA and IEC at their defaults); override for configs that start elsewhere."""
        return True

    def perturb(self, layer: LoRALinear, gen: torch.Generator) -> None:
        """Move every adapter parameter away from its initial value (a trained adapter), so
        checks do not pass only because, e.g., an elastic scalar is still 0."""
        with torch.no_grad():
            for p in layer.adapter.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.1)

    # -- parametrisation and fixtures --------------------------------------------------

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if not self.adapter:
            raise TypeError(f"{type(self).__name__} must set `adapter` to the name under test")
        if "config" in metafunc.fixturenames:
            if not self.configs:
                raise TypeError(f"{type(self).__name__}.configs is empty")
            metafunc.parametrize("config", [dict(c) for c in self.configs], ids=[_config_id(c) for c in self.configs])

    @pytest.fixture
    def spec(self) -> AdapterSpec:
        return self.get_spec()

    def lora_config(self, config: Mapping[str, Any], **extra: Any) -> LoRAConfig:
        return LoRAConfig.model_validate(
            {"r": self.rank, "alpha": self.alpha, "adapter": self.adapter, "adapter_config": dict(config), **extra}
        )

    def make_weight(self) -> tuple[QuantizedWeight, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        w = torch.randn(self.shape, generator=gen, dtype=torch.float64) * 0.05
        bias = torch.randn(self.shape[0], generator=gen, dtype=torch.float64) * 0.1
        return _quantize(w, _Int4Config(), None), bias.float()

    def make_layer(
        self, spec: AdapterSpec, config: Mapping[str, Any], *, zero_b: bool = False, trained: bool = True, **extra: Any
    ) -> LoRALinear:
        qweight, bias = self.make_weight()
        out_f, in_f = self.shape
        gen = torch.Generator().manual_seed(self.seed + 1)
        a = torch.randn(self.rank, in_f, generator=gen) / in_f**0.5
        b = torch.zeros(out_f, self.rank) if zero_b else torch.randn(out_f, self.rank, generator=gen) * 0.1
        layer = LoRALinear(
            qweight, contract_quantizer_spec(), self.lora_config(config, **extra),
            lora_a=a, lora_b=b, bias=bias, adapter=spec,
        )
        if trained:
            self.perturb(layer, torch.Generator().manual_seed(self.seed + 2))
        return layer

    def make_input(self, dtype: torch.dtype = torch.float32, seed: int = 3) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + seed)
        return torch.randn(self.tokens, self.shape[1], generator=gen, dtype=torch.float64).to(dtype)

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

    # -- state, checkpoints, PEFT ------------------------------------------------------------

    def test_state_dict_round_trip(self, spec: AdapterSpec, config: dict[str, Any]) -> None:
        layer = self.make_layer(spec, config)
        fresh = self.make_layer(spec, config, trained=False)
        fresh.load_state_dict(layer.state_dict())
        x = self.make_input()
        with torch.no_grad():
            assert torch.equal(fresh(x), layer(x)), "a layer loading the state dict computes something else"
        if spec.validate is not None:
            spec.validate(fresh.adapter)
            with torch.no_grad():
                next(iter(fresh.adapter.parameters())).view(-1)[0] = float("nan")
            with pytest.raises(ValueError, match=r"non-finite|nan|NaN|finite"):
                spec.validate(fresh.adapter)

    def test_checkpoint_records_and_restores_the_variant(
        self, spec: AdapterSpec, config: dict[str, Any], tmp_path: Path
    ) -> None:
        from lqmod.io import load_checkpoint, read_manifest, save_checkpoint

        layer = self.make_layer(spec, config)
        model = nn.Sequential(layer)
        save_checkpoint(model, tmp_path / "ckpt")
        header = read_manifest(tmp_path / "ckpt")["layers"]["0"]
        assert header["adapter"] == spec.name
        assert spec.config_model.model_validate(header["adapter_config"]) == layer.adapter_config
        skeleton = nn.Sequential(nn.Linear(self.shape[1], self.shape[0]))
        loaded = load_checkpoint(tmp_path / "ckpt", model=skeleton, registry=self.make_registry(spec))
        back = loaded.get_submodule("0")
        assert isinstance(back, LoRALinear) and back.adapter_name == spec.name
        assert type(back.adapter) is type(layer.adapter)
        x = self.make_input()
        with torch.no_grad():
            assert torch.equal(back(x), layer.eval()(x)), "the reloaded layer computes something else"
        assert {n for n, p in back.named_parameters() if p.requires_grad} == {
            n for n, p in layer.named_parameters() if p.requires_grad
        }

    def test_peft_export(self, spec: AdapterSpec, config: dict[str, Any], tmp_path: Path) -> None:
        from lqmod.io import dequantized_copy, export_peft

        layer = self.make_layer(spec, config).eval()
        model = nn.Sequential(layer)
        if spec.peft is None:
            with pytest.raises(ValueError, match=rf"PEFT cannot load the '{spec.name}' adapter variant"):
                export_peft(model, tmp_path / "peft")
            return
        peft = pytest.importorskip("peft")
        export_peft(model, tmp_path / "peft")
        dense = dequantized_copy(model)
        loaded = peft.PeftModel.from_pretrained(dense, str(tmp_path / "peft")).eval()
        x = self.make_input()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), layer(x), rtol=1e-5, atol=1e-6)

    def test_spec_is_a_frozen_dataclass(self, spec: AdapterSpec) -> None:
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.name = "other"  # type: ignore[misc]
