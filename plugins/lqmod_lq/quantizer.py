"""The ``lq`` and ``lq-fisher`` quantizers: ``W ~ base(Q) + L1 L2``, with the factors frozen in the base.

Stored tensors (their bytes are the storage cost, so the factors are counted exactly):

* ``base_<name>``: every tensor of the base quantizer's weight ``Q``;
* the factors ``l1`` (out, rank) and ``l2`` (rank, in) in ``factor_dtype`` (``bf16``, ``fp16``,
  ``fp32``, or ``int8`` codes plus ``l1_scale`` / ``l2_scale``: see :mod:`lqmod_lq.factors`).

``meta`` keeps the base weight's own meta (``base_meta``). ``materialize`` is
``base.materialize(Q) + l1 @ l2`` computed in float32, a pure function of the tensors.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from pydantic_core.core_schema import ValidationInfo

from lqmod.config import ConfigError, QuantizerConfig, validate_config
from lqmod.plugins import UnknownPluginError, get_registry
from lqmod.quantize import QuantizationError, quantize_weight
from lqmod.types import LayerStats, QuantizedWeight, QuantizerSpec
from lqmod_lq.decompose import decompose
from lqmod_lq.factors import FactorKind, decode, factor_bits

__all__ = [
    "LQConfig",
    "LQFisherConfig",
    "base_qweight",
    "bits_per_param",
    "make_materialize",
    "make_quantize",
    "options",
]

NAME = "lq"
FISHER_NAME = "lq-fisher"
BASE_PREFIX = "base_"


class LQConfig(QuantizerConfig):
    """Low-rank plus quantized: a base quantizer (any registered one) and rank-``rank`` factors."""

    base: str = Field("nf", description="registered quantizer for Q (not an lq quantizer)")
    base_config: dict[str, Any] = Field(
        default_factory=lambda: {"bits": 3}, description="the base quantizer's config, validated by its config model"
    )
    rank: int = Field(16, ge=1, description="rank of L1 L2")
    max_iters: int = Field(50, ge=1, le=1000, description="cap on alternating (SVD, quantize) rounds")
    tol: float = Field(1e-4, ge=0.0, lt=1.0, description="stop when an iterate improves the error by less (relative)")
    factor_dtype: FactorKind = Field("int8", description="storage of L1, L2: bf16, fp16, fp32 or int8 (+ scales)")
    fisher_weighted: bool = Field(False, description="weight the objective with stats.fisher (then required)")
    oversample: int = Field(10, ge=0, le=1024, description="extra sketch columns of the randomized SVD")
    power_iters: int = Field(2, ge=0, le=32, description="subspace iterations of the randomized SVD")
    seed: int = Field(0, ge=0, description="seed of the randomized SVD's sketches")

    @field_validator("base")
    @classmethod
    def _base_is_registered(cls, name: str) -> str:
        if name in (NAME, FISHER_NAME):
            raise ValueError(f"base={name!r}: an lq quantizer cannot be its own base; use e.g. 'nf'")
        try:
            get_registry().quantizer(name)
        except UnknownPluginError as exc:
            raise ValueError(str(exc)) from None
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
        # The canonical (complete, JSON) form: {"bits": 3} and its spelled-out equivalent are equal.
        normal: dict[str, Any] = json.loads(json.dumps(cfg.model_dump(mode="json")))
        return normal

    def __hash__(self) -> int:  # base_config is a dict; options go into sets and dict keys
        return hash(json.dumps(self.model_dump(mode="json"), sort_keys=True))


class LQFisherConfig(LQConfig):
    """``lq`` with the objective weighted by the diagonal Fisher (``stats.fisher`` required)."""

    fisher_weighted: Literal[True] = True

    def __hash__(self) -> int:
        return hash(json.dumps(self.model_dump(mode="json"), sort_keys=True))


def _base_spec(cfg: LQConfig | dict[str, Any]) -> QuantizerSpec:
    name = cfg.base if isinstance(cfg, LQConfig) else str(cfg["base"])
    return get_registry().quantizer(name)


def _check_shape(cfg: LQConfig, shape: tuple[int, int]) -> None:
    if cfg.rank >= min(shape):
        raise QuantizationError(
            f"rank={cfg.rank} must be below min(out_features, in_features)={min(shape)} for shape {shape}; "
            f"ranks that fit: 1..{min(shape) - 1}"
        )


def make_quantize(name: str) -> Any:
    def quantize(weight: torch.Tensor, cfg: LQConfig, stats: LayerStats | None = None) -> QuantizedWeight:
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        _check_shape(cfg, shape)
        fisher = None
        if cfg.fisher_weighted:
            if stats is None or stats.fisher is None:
                raise QuantizationError(
                    f"{name} with fisher_weighted=True needs stats.fisher (a diagonal Fisher shaped like the weight; "
                    "see lqmod.calibration.diagonal_fisher); set fisher_weighted=False for the unweighted objective"
                )
            fisher = stats.fisher
        spec = _base_spec(cfg)
        base_cfg = spec.config_model.model_validate(cfg.base_config)

        def quantize_base(residual: torch.Tensor) -> QuantizedWeight:
            return quantize_weight(spec, residual, base_cfg, stats, name=f"{name} base ({spec.name})")

        result = decompose(
            weight, cfg.rank, quantize_base, spec.materialize, fisher=fisher,
            max_iters=cfg.max_iters, tol=cfg.tol, oversample=cfg.oversample, power_iters=cfg.power_iters,
            seed=cfg.seed, factors=cfg.factor_dtype,
        )  # fmt: skip
        tensors = {BASE_PREFIX + k: v for k, v in result.qweight.tensors.items()}
        tensors.update(result.stored)
        meta = {
            "base_meta": result.qweight.meta,
            "iterations": len(result.errors),
            "best_iteration": result.best,
            "error": result.error,
        }
        return QuantizedWeight(name, cfg.model_dump(mode="json"), shape, tensors, meta, dtype=weight.dtype)

    return quantize


def base_qweight(qweight: QuantizedWeight) -> QuantizedWeight:
    """The base quantizer's weight ``Q`` stored inside an lq weight."""
    n = len(BASE_PREFIX)
    return QuantizedWeight(
        str(qweight.config["base"]),
        dict(qweight.config["base_config"]),
        qweight.shape,
        {k[n:]: v for k, v in qweight.tensors.items() if k.startswith(BASE_PREFIX)},
        dict(qweight.meta.get("base_meta", {})),
        torch.float32,
    )


def make_materialize() -> Any:
    def materialize(qweight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        base = base_qweight(qweight)
        spec = get_registry().quantizer(base.quantizer)
        dense = spec.materialize(base, torch.float32)
        l1, l2 = decode(qweight.tensors, str(qweight.config["factor_dtype"]))
        low = l1 @ l2
        return (dense + low).to(dtype)

    return materialize


def bits_per_param(cfg: LQConfig, shape: tuple[int, int]) -> float:
    _check_shape(cfg, shape)
    spec = _base_spec(cfg)
    n = shape[0] * shape[1]
    # The base reports storage_bits / n; rounding back to the integer numerator keeps the
    # total a single integer division, equal to QuantizedWeight.bits_per_param() bit for bit.
    base_bits = round(spec.bits_per_param(spec.config_model.model_validate(cfg.base_config), shape) * n)
    return (base_bits + factor_bits(cfg.factor_dtype, shape, cfg.rank)) / n


def options() -> list[LQConfig]:
    """NF2 / NF3 bases (block size 64, double quantization) x rank 4 / 8 / 16 / 32, int8 factors.

    int8 factors: on real MiniLM weights they give the same error as bf16 ones (to 3-4
    digits) at half the factor cost, and the factor cost decides whether the low-rank part
    pays for itself (README.md). Ranks are absolute: a rank at or above min(out, in) raises
    QuantizationError, which an allocator treats as "does not fit this matrix". The factors
    cost ``(8 r (m + n) + 64 r) / (m n)`` bits per weight: 0.17 at r=4 on 384 x 384, 0.06 at
    r=32 on 4096 x 4096.
    """
    return [
        LQConfig(
            base="nf", base_config={"bits": bits, "blocksize": 64, "double_quant": True}, rank=rank, factor_dtype="int8"
        )
        for bits in (2, 3)
        for rank in (4, 8, 16, 32)
    ]


def fisher_options() -> list[LQConfig]:
    return [LQFisherConfig(**opt.model_dump(exclude={"fisher_weighted"})) for opt in options()]
