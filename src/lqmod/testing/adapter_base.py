"""The adapter contract's settings, the hooks a subclass may override, and the layers it builds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import pytest
import torch

import lqmod
from lqmod.config import LoRAConfig
from lqmod.nn.lora_linear import LoRALinear
from lqmod.plugins import Registry
from lqmod.testing.adapter_quantizer import _Int4Config, _quantize, _SuitePlugin, contract_quantizer_spec
from lqmod.types import AdapterSpec, QuantizedWeight


def _config_id(config: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(config.items())) or "defaults"


class AdapterContractBase:
    """What every part of :class:`~lqmod.testing.AdapterContract` shares: settings, hooks, builders."""

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
