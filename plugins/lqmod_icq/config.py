"""The ``icq`` config: a LUT-style base quantizer and the shift search around each block's median."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, field_validator
from pydantic_core.core_schema import ValidationInfo

from lqmod.config import ConfigError, QuantizerConfig, validate_config
from lqmod.plugins import UnknownPluginError, get_registry
from lqmod.types import QuantizerSpec

__all__ = ["NAME", "ICQConfig", "base_spec"]

NAME = "icq"


class ICQConfig(QuantizerConfig):
    """Information calibration quantization (IR-QLoRA) over a LUT-style base quantizer."""

    base: str = Field("nf", description="registered quantizer with a lut_format and no statistics needs (nf, rtn)")
    base_config: dict[str, Any] = Field(
        default_factory=lambda: {"bits": 4}, description="the base quantizer's config, validated by its config model"
    )
    tau_range: float = Field(
        0.1, gt=0.0, le=1.0, description="half-width of the shift grid, in units of sigma * block absmax (paper: 0.1)"
    )
    tau_n: int = Field(51, ge=1, le=1000, description="grid points on each side of the median (paper: 51)")
    tau_groupsize: int = Field(
        256, ge=1, le=65536, description="blocks sharing one float32 scale of their 8-bit shifts"
    )

    @field_validator("base")
    @classmethod
    def _base_is_lut_style(cls, name: str) -> str:
        if name == NAME:
            raise ValueError("base='icq': icq cannot wrap itself; use e.g. 'nf' or 'rtn'")
        try:
            spec = get_registry().quantizer(name)
        except UnknownPluginError as exc:
            raise ValueError(str(exc)) from None
        if spec.lut_format is None:
            raise ValueError(
                f"base={name!r} declares no lut_format; icq needs a LUT-style base (codes -> table -> per-group "
                "scale), e.g. 'nf' or 'rtn', to read each block's codes"
            )
        if spec.needs:
            raise ValueError(
                f"base={name!r} needs statistics {sorted(spec.needs)}: icq re-quantizes the matrix once per shift "
                "candidate and assumes blocks are quantized independently, which calibrated (error-feedback) "
                "quantizers break; use a block-wise base such as 'nf' or 'rtn'"
            )
        return name

    @field_validator("base_config", mode="before")
    @classmethod
    def _base_config_is_valid(cls, data: Any, info: ValidationInfo) -> dict[str, Any]:
        base = info.data.get("base")
        if base is None:  # the base name itself was invalid; that error is reported already
            return dict(data or {})
        spec = get_registry().quantizer(base)
        try:
            cfg = validate_config(spec.config_model, data, what=f"base {base} config")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        # Canonical complete JSON form, so {"bits": 4} equals its spelled-out equivalent.
        normal: dict[str, Any] = json.loads(json.dumps(cfg.model_dump(mode="json")))
        return normal

    def __hash__(self) -> int:  # base_config is a dict; options go into sets and dict keys
        return hash(json.dumps(self.model_dump(mode="json"), sort_keys=True))


def base_spec(cfg: ICQConfig | dict[str, Any]) -> QuantizerSpec:
    name = cfg.base if isinstance(cfg, ICQConfig) else str(cfg["base"])
    return get_registry().quantizer(name)
