"""The contract every LoRA initializer plug-in should pass, as a pytest mix-in.

Subclass it in a ``Test*`` class, set :attr:`InitializerContract.initializer` (and usually
:attr:`~InitializerContract.configs`); pytest then runs every check for each config and each
base quantizer in :attr:`~InitializerContract.quantizers`. The checks are about the hook's
contract, not its quality: adapter shapes and dtypes, determinism, a replacement base that
the layer can use, declared statistics refused when missing, the step-0 layer computing
``Q + scaling * B A``, gradients reaching the adapters, and a checkpoint round trip.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import lqmod
from lqmod.config import InitializerConfig, LoRAConfig, validate_config
from lqmod.model import iter_lora_layers, quantize_model
from lqmod.quantize import QuantizationError, quantize_weight
from lqmod.types import InitializerSpec, LayerStats, QuantizedWeight

__all__ = ["InitializerContract"]

KNOWN_STATS = frozenset({"hessian", "fisher"})


def _json_id(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={_json_id(v)}" for k, v in value.items()) or "default"
    return str(value)


class InitializerContract:
    """Subclass in a ``Test*`` class and set :attr:`initializer` (and usually :attr:`configs`)."""

    #: The registered initializer name.
    initializer: ClassVar[str] = ""
    #: Initializer configs (dicts) to run every config-dependent check with.
    configs: ClassVar[Sequence[dict[str, Any]]] = ({},)
    #: (quantizer, config) bases the layer is quantized with.
    quantizers: ClassVar[Sequence[tuple[str, dict[str, Any]]]] = (("nf", {"bits": 3}),)
    #: (out_features, in_features) of the test weight; in_features should fit every base.
    shape: ClassVar[tuple[int, int]] = (64, 128)
    #: LoRA rank and alpha of the checks.
    rank: ClassVar[int] = 4
    alpha: ClassVar[float] = 8.0
    seed: ClassVar[int] = 0
    #: Calibration tokens of the synthetic statistics.
    n_tokens: ClassVar[int] = 512

    # -- what a subclass may override --------------------------------------------------

    def get_spec(self) -> InitializerSpec:
        return lqmod.get_registry().initializer(self.initializer)

    def make_weight(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.shape, generator=gen, dtype=torch.float64).mul(0.02).float()

    def make_inputs(self, in_features: int, n: int | None = None) -> torch.Tensor:
        """Calibration inputs with uneven, correlated features (what real activations look like)."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        n = self.n_tokens if n is None else n
        mix = torch.randn(in_features, in_features, generator=gen, dtype=torch.float64) / in_features**0.5
        scales = torch.logspace(-1, 1, in_features, dtype=torch.float64)
        return (torch.randn(n, in_features, generator=gen, dtype=torch.float64) @ mix * scales).float()

    def stats(self, weight: torch.Tensor) -> LayerStats:
        """Statistics for a layer of ``weight``'s shape: every field an initializer may need."""
        x = self.make_inputs(weight.shape[1]).double()
        gen = torch.Generator().manual_seed(self.seed + 2)
        fisher = torch.rand(weight.shape, generator=gen, dtype=torch.float64).add(0.1).float()
        return LayerStats(hessian=x.T @ x, n_tokens=x.shape[0], fisher=fisher, act_absmean=x.abs().mean(0).float())

    # -- parametrisation and fixtures --------------------------------------------------

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if not self.initializer:
            raise TypeError(f"{type(self).__name__} must set `initializer` to the name under test")
        if "init_config" in metafunc.fixturenames:
            metafunc.parametrize("init_config", list(self.configs), ids=[_json_id(c) for c in self.configs])
        if "base" in metafunc.fixturenames:
            metafunc.parametrize("base", list(self.quantizers), ids=[f"{q}({_json_id(c)})" for q, c in self.quantizers])

    @pytest.fixture
    def spec(self) -> InitializerSpec:
        return self.get_spec()

    def _lora(self, init_config: dict[str, Any]) -> LoRAConfig:
        return LoRAConfig(r=self.rank, alpha=self.alpha, initializer=self.initializer, initializer_config=init_config)

    def _run(
        self, spec: InitializerSpec, init_config: dict[str, Any], base: tuple[str, dict[str, Any]], seed: int = 0
    ) -> tuple[QuantizedWeight, Any]:
        registry = lqmod.get_registry()
        qspec = registry.quantizer(base[0])
        weight = self.make_weight()
        stats = self.stats(weight)
        qweight = quantize_weight(qspec, weight, base[1], stats)
        cfg = validate_config(spec.config_model, init_config, what=f"{spec.name} config")
        result = spec.initialize(
            weight=weight, qweight=qweight, materialize=qspec.materialize, lora=self._lora(init_config),
            config=cfg, stats=stats, generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        return qweight, result

    def _model(self) -> nn.Sequential:
        torch.manual_seed(self.seed)
        out_f, in_f = self.shape
        first = nn.Linear(in_f, out_f)
        with torch.no_grad():
            first.weight.copy_(self.make_weight())
        return nn.Sequential(first, nn.GELU(), nn.Linear(out_f, in_f, bias=False)).eval()

    def _model_stats(self, model: nn.Sequential) -> dict[str, LayerStats]:
        from lqmod.calibration import collect_hessians

        x = self.make_inputs(self.shape[1])
        stats = collect_hessians(model, ["0", "2"], [{"input": x[i : i + 128]} for i in range(0, len(x), 128)],
                                 progress=False)  # fmt: skip
        gen = torch.Generator().manual_seed(self.seed + 3)
        for name, s in stats.items():
            w = model.get_submodule(name).weight
            assert isinstance(w, torch.Tensor)
            s.fisher = torch.rand(tuple(w.shape), generator=gen).add(0.1)
        return stats

    # -- registration --------------------------------------------------------------------

    def test_spec_is_well_formed(self, spec: InitializerSpec) -> None:
        assert spec.name == self.initializer
        assert issubclass(spec.config_model, InitializerConfig)
        assert callable(spec.initialize)
        assert spec.needs <= KNOWN_STATS, f"needs {sorted(spec.needs)}: lqmod gathers only {sorted(KNOWN_STATS)}"
        cfg = spec.config_model()
        with pytest.raises(ValueError):
            spec.config_model.model_validate({"no_such_option": 1})
        with pytest.raises(ValueError):
            cfg.version = 99  # type: ignore[misc]  # frozen

    # -- what initialize returns -----------------------------------------------------------

    def test_adapter_shapes_and_dtypes(
        self, spec: InitializerSpec, init_config: dict[str, Any], base: tuple[str, dict[str, Any]]
    ) -> None:
        qweight, result = self._run(spec, init_config, base)
        out_f, in_f = self.shape
        assert tuple(result.lora_a.shape) == (self.rank, in_f)
        assert tuple(result.lora_b.shape) == (out_f, self.rank)
        for t in (result.lora_a, result.lora_b):
            assert t.dtype == torch.float32 and bool(torch.isfinite(t).all())
        if result.qweight is not None:
            assert result.qweight.quantizer == qweight.quantizer
            assert tuple(result.qweight.shape) == tuple(qweight.shape)
            assert result.qweight.bits_per_param() == qweight.bits_per_param()

    def test_initialize_is_deterministic(
        self, spec: InitializerSpec, init_config: dict[str, Any], base: tuple[str, dict[str, Any]]
    ) -> None:
        _, first = self._run(spec, init_config, base, seed=5)
        _, again = self._run(spec, init_config, base, seed=5)
        assert torch.equal(first.lora_a, again.lora_a) and torch.equal(first.lora_b, again.lora_b)

    def test_missing_statistics_are_refused(self, spec: InitializerSpec, init_config: dict[str, Any]) -> None:
        if not spec.needs:
            pytest.skip(f"{spec.name} needs no statistics")
        model = self._model()
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(QuantizationError, match="|".join(sorted(spec.needs))):
            quantize_model(model, "nf", {"bits": 3}, lora=self._lora(init_config), progress=False)
        after = model.state_dict()
        assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)

    # -- the adapted model -----------------------------------------------------------------

    def test_step0_layer_is_q_plus_scaled_ba(
        self, spec: InitializerSpec, init_config: dict[str, Any], base: tuple[str, dict[str, Any]]
    ) -> None:
        model = self._model()
        stats = self._model_stats(model)
        quantize_model(model, base[0], base[1], lora=self._lora(init_config), stats=stats, progress=False)
        qspec = lqmod.get_registry().quantizer(base[0])
        x = self.make_inputs(self.shape[1], 16)
        layers = dict(iter_lora_layers(model))
        assert set(layers) == {"0", "2"}
        for name, layer in layers.items():
            inp = x if name == "0" else torch.randn(16, self.shape[0], generator=torch.Generator().manual_seed(9))
            q = qspec.materialize(layer.qweight, torch.float64)
            delta = self._lora(init_config).scaling * (layer.lora_B.double() @ layer.lora_A.double())
            torch.testing.assert_close(layer.merged_weight(torch.float64), q + delta)
            want = inp.double() @ (q + delta).T
            if layer.bias is not None:
                want = want + layer.bias.double()
            with torch.no_grad():
                got = layer(inp)
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)

    def test_gradients_reach_the_adapters(self, spec: InitializerSpec, init_config: dict[str, Any]) -> None:
        model = self._model()
        stats = self._model_stats(model)
        quantize_model(model, "nf", {"bits": 3}, lora=self._lora(init_config), stats=stats, progress=False)
        model(self.make_inputs(self.shape[1], 8)).square().sum().backward()
        for name, layer in iter_lora_layers(model):
            grads = [p.grad for p in (layer.lora_A, layer.lora_B)]
            assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads), name
            assert any(float(g.abs().sum()) > 0 for g in grads if g is not None), name

    def test_checkpoint_round_trip(
        self, spec: InitializerSpec, init_config: dict[str, Any], tmp_path: Path
    ) -> None:
        from lqmod.io import load_checkpoint, save_checkpoint

        model = self._model()
        stats = self._model_stats(model)
        quantize_model(model, "nf", {"bits": 3}, lora=self._lora(init_config), stats=stats, progress=False)
        save_checkpoint(model, tmp_path / "ckpt")
        skeleton = nn.Sequential(
            nn.Linear(self.shape[1], self.shape[0]), nn.GELU(), nn.Linear(self.shape[0], self.shape[1], bias=False)
        )
        loaded = load_checkpoint(tmp_path / "ckpt", model=skeleton)
        x = self.make_inputs(self.shape[1], 8)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
