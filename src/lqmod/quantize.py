"""Checked entry points around a quantizer's callables.

Plug-ins implement the math; this module refuses bad input (non-finite weights, wrong
ranks, invalid configs) with messages that say what is wrong and what is accepted, and
checks that what a plug-in returned is consistent, so every quantizer gets the same
guarantees for free.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import torch

from lqmod.config import ConfigError, QuantizerConfig, validate_config
from lqmod.types import LayerStats, QuantizedWeight, QuantizerSpec

if TYPE_CHECKING:
    from lqmod.plugins import Registry

__all__ = [
    "QuantizationError",
    "check_materialized",
    "check_weight",
    "quantize_weight",
    "relative_error",
    "resolve_config",
    "resolve_spec",
    "validate_qweight",
]


class QuantizationError(ValueError):
    """The weight cannot be quantized as asked; the message says why and what would work."""


def resolve_spec(spec: QuantizerSpec | str, registry: Registry | None = None) -> QuantizerSpec:
    """A spec, or the registered quantizer of that name."""
    if isinstance(spec, QuantizerSpec):
        return spec
    if isinstance(spec, str):
        from lqmod.plugins import get_registry

        return (registry or get_registry()).quantizer(spec)
    raise TypeError(
        f"quantizer must be a registered name (e.g. 'nf') or a QuantizerSpec, got {type(spec).__name__} {spec!r}"
    )


def resolve_config(spec: QuantizerSpec, config: Any) -> QuantizerConfig:
    if config is not None and not isinstance(config, (dict, QuantizerConfig)) and not hasattr(config, "items"):
        # dict("bits=4") would fail with an unrelated "dictionary update sequence" error.
        raise ConfigError(
            f"{spec.name} config must be a mapping or a {spec.config_model.__name__}, got "
            f"{type(config).__name__} {config!r}; e.g. {{'bits': 4}} (the CLI's 'bits=4' text is parsed by "
            "lqmod.cli.parse_kv)"
        )
    cfg: QuantizerConfig = validate_config(spec.config_model, config, what=f"{spec.name} config")
    return cfg


def relative_error(approx: torch.Tensor, exact: torch.Tensor, *, rows_per_chunk: int = 4096) -> float:
    """``||approx - exact||_F / ||exact||_F`` in float64, a chunk of rows at a time.

    float64 cannot overflow for any finite float32 input (1e38 squared is 1e76), where a
    float32 norm of 1e38-sized weights is inf and the ratio NaN; chunking bounds the extra
    memory to ``rows_per_chunk`` float64 rows.
    """
    num = 0.0
    den = 0.0
    for start in range(0, exact.shape[0], rows_per_chunk):
        e = exact[start : start + rows_per_chunk].double()
        a = approx[start : start + rows_per_chunk].double()
        num += float((a - e).pow(2).sum())
        den += float(e.pow(2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return (num / den) ** 0.5


def check_materialized(spec: QuantizerSpec, qweight: QuantizedWeight, dense: torch.Tensor, *, name: str) -> None:
    """Refuse a weight that materializes non-finite values (e.g. a float16 scale that overflowed)."""
    finite = torch.isfinite(dense)
    if not bool(finite.all()):
        count = int((~finite).sum())
        first = tuple((~finite).nonzero()[0].tolist())
        raise QuantizationError(
            f"{name}: quantizer {spec.name!r} with config {qweight.config} materializes {count} non-finite "
            f"value(s) (first at {first}) from finite input: typically a scale that overflowed its storage "
            "type on large weights; choose a config with wider scales (e.g. float32, no double quantization) "
            "or rescale the weight"
        )


def validate_qweight(spec: QuantizerSpec, qweight: QuantizedWeight, *, name: str = "weight") -> QuantizedWeight:
    """Check a weight read back from storage against its quantizer and config.

    Returns the weight with its config in complete, canonical JSON form (the validated
    config's dump: a key left out is its default, ``"4"`` is ``4``), because ``materialize``
    reads that dict and must see exactly what was validated. Three checks, the first failing
    one raising :class:`QuantizationError` naming ``name``: the stored config validates
    against ``spec.config_model``; the quantizer's own ``validate`` hook accepts the tensors;
    and the stored bits equal ``spec.bits_per_param(config, shape)`` (every quantizer states
    its exact cost), so a config edited to another width is caught even for a quantizer
    without ``validate``.
    """
    if qweight.quantizer != spec.name:
        raise QuantizationError(f"{name}: weight of quantizer {qweight.quantizer!r} given to {spec.name!r}")
    try:
        cfg = resolve_config(spec, qweight.config)
    except ConfigError as exc:
        raise QuantizationError(f"{name}: stored config is invalid: {exc}") from None
    canonical = dataclasses.replace(qweight, config=json.loads(json.dumps(cfg.model_dump(mode="json"))))
    if spec.validate is not None:
        try:
            spec.validate(canonical, cfg)
        except Exception as exc:  # any failure of the hook means "this weight cannot be trusted"
            raise QuantizationError(f"{name}: {' '.join(str(exc).split())}") from None
    try:
        expected = spec.bits_per_param(cfg, canonical.shape)
    except QuantizationError as exc:
        raise QuantizationError(f"{name}: stored config does not fit shape {canonical.shape}: {exc}") from None
    actual = canonical.bits_per_param()
    if expected != actual:
        raise QuantizationError(
            f"{name}: stored tensors take {actual:.6g} bits/param but {spec.name} config {canonical.config} "
            f"implies {expected:.6g}: the config does not describe these tensors"
        )
    return canonical


def check_weight(weight: torch.Tensor, *, name: str = "weight") -> None:
    if weight.ndim != 2:
        raise QuantizationError(
            f"{name}: expected a 2-D (out_features, in_features) matrix, got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise QuantizationError(f"{name}: expected a floating-point tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise QuantizationError(f"{name}: empty matrix of shape {tuple(weight.shape)}")
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        count = int((~finite).sum())
        raise QuantizationError(
            f"{name}: {count} non-finite value(s) (NaN or Inf), first at index {tuple(bad)}; "
            "only finite weights can be quantized"
        )


def quantize_weight(
    spec: QuantizerSpec | str,
    weight: torch.Tensor,
    config: Any = None,
    stats: LayerStats | None = None,
    *,
    name: str = "weight",
    check_finite: bool = True,
) -> QuantizedWeight:
    """Validate, quantize with ``spec`` (a spec or a registered name), and check the result.

    The result must have the weight's shape and the quantizer's name, and (unless
    ``check_finite=False``, for callers that materialize it themselves and call
    :func:`check_materialized`) materialize to finite values.
    """
    spec = resolve_spec(spec)
    cfg = resolve_config(spec, config)
    check_weight(weight, name=name)
    missing = [s for s in sorted(spec.needs) if stats is None or getattr(stats, s, None) is None]
    if missing:
        raise QuantizationError(
            f"{name}: quantizer {spec.name!r} needs calibration statistics {missing}; "
            "pass calibration data (see lqmod.calibration)"
        )
    with torch.no_grad():
        try:
            qweight = spec.quantize(weight.detach(), cfg, stats)
        except QuantizationError as exc:
            raise QuantizationError(f"{name}: {exc}") from None
    if tuple(qweight.shape) != tuple(weight.shape):
        raise RuntimeError(
            f"quantizer {spec.name!r} returned shape {qweight.shape} for a weight of shape "
            f"{tuple(weight.shape)}: a plug-in bug"
        )
    if qweight.quantizer != spec.name:
        raise RuntimeError(f"quantizer {spec.name!r} labelled its output {qweight.quantizer!r}: a plug-in bug")
    if check_finite:
        with torch.no_grad():
            check_materialized(spec, qweight, spec.materialize(qweight, torch.float32), name=name)
    return qweight
