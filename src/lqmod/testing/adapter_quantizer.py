"""The adapter contract's own base quantizer (4-bit integers, one scale per row), so the suite
names no plug-in, and the pluggy plug-in that registers it in the registries the suite builds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

import lqmod
from lqmod.config import QuantizerConfig
from lqmod.types import AdapterSpec, QuantizedWeight, QuantizerSpec, check_tensor_layout

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
