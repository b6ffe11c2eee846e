"""What a :class:`~lqmod.testing.QuantizerContract` subclass sets and overrides, the
parametrisation of its tests and their fixtures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import pytest
import torch
from pydantic import BaseModel

import lqmod
from lqmod.config import QuantizerConfig, validate_config
from lqmod.quantize import quantize_weight
from lqmod.testing.hard_weights import REAL_WEIGHT, WEIGHT_KINDS, _real_matrix
from lqmod.types import LayerStats, QuantizedWeight, QuantizerSpec

ConfigLike = Mapping[str, Any] | QuantizerConfig


def _config_id(config: ConfigLike) -> str:
    data = config.model_dump(exclude_unset=True) if isinstance(config, BaseModel) else dict(config)
    return ",".join(f"{k}={v}" for k, v in sorted(data.items())) or "defaults"


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class QuantizerContractBase:
    """The settings, overridable hooks and fixtures of :class:`~lqmod.testing.QuantizerContract`."""

    #: The registered quantizer name.
    quantizer: ClassVar[str] = ""
    #: Configs to run every config-dependent check with (dicts or config instances).
    configs: ClassVar[Sequence[ConfigLike]] = ({},)
    #: The (out_features, in_features) of the test weight; in_features should fit every config.
    shape: ClassVar[tuple[int, int]] = (48, 256)
    #: Upper bound of the relative Frobenius error on a Gaussian weight. 1.0 is what
    #: materializing zeros achieves, so the default only demands "better than nothing".
    max_relative_error: ClassVar[float] = 1.0
    #: dtypes ``materialize`` must produce.
    materialize_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16, torch.float16)
    #: Low-precision weight dtypes ``quantize`` must accept.
    input_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.bfloat16, torch.float16)
    device: ClassVar[str] = "cpu"
    seed: ClassVar[int] = 0
    #: Whether ``quantize`` gives the same bits with 1 and 2 torch threads. Set False only for
    #: a quantizer whose docs state what is reproducible instead (e.g. lq: same thread count).
    thread_count_independent: ClassVar[bool] = True
    #: Bound of the relative error on the largest 0.5% entries of a hard weight.
    extreme_error_bound: ClassVar[float] = 0.5
    #: The trained matrix the "real" test weight is cut from (see :func:`make_hard_weight`).
    real_weight: ClassVar[str] = REAL_WEIGHT

    # -- what a subclass may override --------------------------------------------------

    def get_spec(self) -> QuantizerSpec:
        """The spec under test; by default looked up in the (entry-point built) registry."""
        return lqmod.get_registry().quantizer(self.quantizer)

    def make_weight(self, dtype: torch.dtype = torch.float32, seed: int | None = None) -> torch.Tensor:
        """The test weight: i.i.d. N(0, 0.02^2), roughly what a trained linear layer holds."""
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        return (torch.randn(self.shape, generator=gen, dtype=torch.float64) * 0.02).to(self.device, dtype)

    def stats(self, weight: torch.Tensor) -> LayerStats | None:
        """Calibration statistics for ``weight``; override for quantizers with ``needs``."""
        return None

    def relative_error_bound(self, config: QuantizerConfig) -> float:
        return self.max_relative_error

    def make_hard_weight(self, kind: str) -> torch.Tensor | None:
        """A test weight of :attr:`shape` that is harder than a Gaussian, or None if unavailable.

        ``"outliers"``: N(0, 0.02^2) with 0.5% of the entries (at least 2) replaced by
        +-25..60 standard deviations, as activation-outlier channels leave in LLM weights;
        ``"heavy-tailed"``: 0.02 x Student-t(2), whose variance is infinite;
        ``"real"``: the top-left block of :attr:`real_weight` in all-MiniLM-L6-v2.
        """
        gen = torch.Generator().manual_seed(self.seed + 11)
        out_f, in_f = self.shape
        if kind == "outliers":
            w = torch.randn(self.shape, generator=gen, dtype=torch.float64) * 0.02
            n = max(2, w.numel() // 200)
            idx = torch.randperm(w.numel(), generator=gen)[:n]
            sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
            w.view(-1)[idx] = sign * (25 + 35 * torch.rand(n, generator=gen, dtype=torch.float64)) * 0.02
        elif kind == "heavy-tailed":
            z = torch.randn(self.shape, generator=gen, dtype=torch.float64)
            chi2 = torch.randn((2, *self.shape), generator=gen, dtype=torch.float64).pow(2).sum(0)
            w = 0.02 * z / (chi2 / 2).sqrt()
        elif kind == "real":
            full = _real_matrix(self.real_weight)
            if full is None or full.shape[0] < out_f or full.shape[1] < in_f:
                return None
            w = full[:out_f, :in_f].double()
        else:
            raise ValueError(f"unknown weight kind {kind!r}; choose one of {WEIGHT_KINDS}")
        return w.to(self.device, torch.float32).contiguous()

    def hard_weight_error_bound(self, config: QuantizerConfig, kind: str) -> float:
        """Bound of the relative error on a hard weight; by default 1.0, what zeros achieve."""
        return 1.0

    # -- parametrisation and fixtures --------------------------------------------------

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        # pytest calls this on an instance of every collected class that defines it.
        if not self.quantizer:
            raise TypeError(f"{type(self).__name__} must set `quantizer` to the name under test")
        if "config" in metafunc.fixturenames:
            if not self.configs:
                raise TypeError(f"{type(self).__name__}.configs is empty")
            metafunc.parametrize("config", list(self.configs), ids=[_config_id(c) for c in self.configs])
        if "dtype" in metafunc.fixturenames:
            metafunc.parametrize("dtype", self.materialize_dtypes, ids=_dtype_id)
        if "input_dtype" in metafunc.fixturenames:
            metafunc.parametrize("input_dtype", self.input_dtypes, ids=_dtype_id)
        if "weight_kind" in metafunc.fixturenames:
            metafunc.parametrize("weight_kind", WEIGHT_KINDS)

    @pytest.fixture
    def spec(self) -> QuantizerSpec:
        return self.get_spec()

    @pytest.fixture
    def cfg(self, spec: QuantizerSpec, config: ConfigLike) -> QuantizerConfig:
        resolved: QuantizerConfig = validate_config(spec.config_model, config, what=f"{spec.name} config")
        return resolved

    @pytest.fixture
    def weight(self) -> torch.Tensor:
        return self.make_weight()

    @pytest.fixture
    def qweight(self, spec: QuantizerSpec, cfg: QuantizerConfig, weight: torch.Tensor) -> QuantizedWeight:
        return quantize_weight(spec, weight, cfg, self.stats(weight))
