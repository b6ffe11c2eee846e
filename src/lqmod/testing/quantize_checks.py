"""Quantizer contract checks of registration, config, ``quantize`` and the ``validate`` hook."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from pydantic import ValidationError

from lqmod.config import ConfigError, QuantizerConfig, validate_config
from lqmod.quantize import QuantizationError, quantize_weight, validate_qweight
from lqmod.testing.comparisons import _bitwise_equal, _json_normalised, relative_error
from lqmod.testing.quantizer_base import QuantizerContractBase
from lqmod.types import LayerStats, QuantizedWeight, QuantizerSpec


class QuantizeChecks(QuantizerContractBase):
    """Registration, config, ``quantize`` and ``validate`` (a part of :class:`~lqmod.testing.QuantizerContract`)."""

    # -- registration and config ---------------------------------------------------------

    def test_spec_is_well_formed(self, spec: QuantizerSpec) -> None:
        assert spec.name == self.quantizer
        assert isinstance(spec.config_model, type), f"config_model {spec.config_model!r} is not a class"
        assert issubclass(spec.config_model, QuantizerConfig), (
            f"config_model {spec.config_model!r} must subclass lqmod.QuantizerConfig"
        )
        for attr in ("quantize", "materialize", "bits_per_param", "options"):
            assert callable(getattr(spec, attr)), f"spec.{attr} is not callable"
        known = {f.name for f in dataclasses.fields(LayerStats)}
        assert spec.needs <= known, f"needs {sorted(spec.needs - known)} are not LayerStats fields {sorted(known)}"

    def test_config_is_frozen_and_forbids_extras(self, spec: QuantizerSpec, cfg: QuantizerConfig) -> None:
        with pytest.raises((ValidationError, TypeError, AttributeError)):
            cfg.version = cfg.version + 1  # type: ignore[misc]
        # Options and plans put configs in sets and dict keys.
        hash(cfg)
        with pytest.raises(ConfigError, match="no_such_field"):
            validate_config(spec.config_model, {**cfg.model_dump(), "no_such_field": 1}, what=spec.name)
        # A checkpoint stores the config as JSON and rebuilds it from there.
        assert spec.config_model.model_validate(_json_normalised(cfg.model_dump())) == cfg

    # -- quantize ------------------------------------------------------------------------

    def test_quantize_returns_quantized_weight(
        self, spec: QuantizerSpec, cfg: QuantizerConfig, weight: torch.Tensor
    ) -> None:
        original = weight.clone()
        with torch.no_grad():
            qw = spec.quantize(weight, cfg, self.stats(weight))
        assert isinstance(qw, QuantizedWeight)
        assert qw.quantizer == spec.name
        assert tuple(qw.shape) == self.shape
        assert all(isinstance(s, int) for s in qw.shape), f"shape {qw.shape!r} must hold ints (JSON header)"
        assert qw.tensors, "a quantized weight must store at least one tensor"
        for name, t in qw.tensors.items():
            assert isinstance(name, str), f"tensor name {name!r}"
            assert isinstance(t, torch.Tensor), f"tensor {name!r} is a {type(t).__name__}"
            assert t.device.type == torch.device(self.device).type, f"tensor {name!r} is on {t.device}"
            assert not t.requires_grad, f"tensor {name!r} requires grad"
        assert _bitwise_equal(weight, original), "quantize modified its input weight in place"
        json.dumps(qw.header())  # the header must be JSON data
        assert spec.config_model.model_validate(_json_normalised(qw.config)) == cfg, (
            "qweight.config must be the config it was quantized with (checkpoints rebuild it from there)"
        )

    def test_quantize_accepts_low_precision_input(
        self, spec: QuantizerSpec, cfg: QuantizerConfig, input_dtype: torch.dtype
    ) -> None:
        weight = self.make_weight(input_dtype)
        qw = quantize_weight(spec, weight, cfg, self.stats(weight))
        dense = spec.materialize(qw, torch.float32)
        assert dense.shape == self.shape
        assert bool(torch.isfinite(dense).all())
        err = relative_error(dense, weight)
        assert err < self.relative_error_bound(cfg), f"relative error {err:.4g} from a {input_dtype} weight"

    def test_non_finite_weight_is_refused(self, spec: QuantizerSpec, cfg: QuantizerConfig) -> None:
        for bad in (float("nan"), float("inf")):
            weight = self.make_weight()
            weight[1, 3] = bad
            with pytest.raises(QuantizationError, match="non-finite"):
                quantize_weight(spec, weight, cfg, self.stats(weight))

    def test_missing_statistics_are_refused(self, spec: QuantizerSpec) -> None:
        if not spec.needs:
            pytest.skip(f"{spec.name} needs no calibration statistics")
        with pytest.raises(QuantizationError, match="needs calibration statistics"):
            quantize_weight(spec, self.make_weight(), self.configs[0], None)

    def test_quantize_is_deterministic(self, spec: QuantizerSpec, cfg: QuantizerConfig, weight: torch.Tensor) -> None:
        # Checkpoints and benchmarks must be reproducible from a seed: a quantizer drawing
        # unseeded random numbers (or reading global RNG state) gives different bits here.
        first = quantize_weight(spec, weight, cfg, self.stats(weight))
        torch.randn(7)  # advances the global RNG: its state must not matter either
        second = quantize_weight(spec, weight.clone(), cfg, self.stats(weight))
        assert _json_normalised(first.header()) == _json_normalised(second.header()), "headers differ"
        for k, v in first.tensors.items():
            assert _bitwise_equal(v, second.tensors[k]), f"quantize is not deterministic: tensor {k!r} differs"

    def test_quantize_is_independent_of_thread_count(self, spec: QuantizerSpec, weight: torch.Tensor) -> None:
        # The first config only: a thread-count dependence lives in the algorithm, not a setting.
        if not self.thread_count_independent:
            pytest.skip(f"{spec.name} is documented as reproducible only at a fixed torch thread count")
        cfg = validate_config(spec.config_model, self.configs[0], what=f"{spec.name} config")
        before = torch.get_num_threads()
        results = []
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results.append(quantize_weight(spec, weight, cfg, self.stats(weight)))
        finally:
            torch.set_num_threads(before)
        one, two = results
        differ = [k for k, v in one.tensors.items() if not _bitwise_equal(v, two.tensors[k])]
        assert not differ, (
            f"quantize gives different {differ} with 1 and 2 torch threads; make it independent of the thread "
            "count, or set thread_count_independent = False and document what is reproducible"
        )

    def test_hard_weights(self, spec: QuantizerSpec, cfg: QuantizerConfig, weight_kind: str) -> None:
        weight = self.make_hard_weight(weight_kind)
        if weight is None:
            pytest.skip(f"no {weight_kind!r} test weight of shape {self.shape} here (all-MiniLM-L6-v2 not installed?)")
        try:
            qw = quantize_weight(spec, weight, cfg, self.stats(weight))
        except QuantizationError as exc:
            # Refusing is allowed only with a clear message, never for ordinary finite weights.
            pytest.fail(f"{weight_kind} weight was refused: {exc}")
        validate_qweight(spec, qw, name=f"{weight_kind} weight")
        dense = spec.materialize(qw, torch.float32)
        assert bool(torch.isfinite(dense).all()), f"{weight_kind} weight materializes non-finite values"
        assert qw.bits_per_param() == spec.bits_per_param(cfg, self.shape)
        err = relative_error(dense, weight)
        bound = self.hard_weight_error_bound(cfg, weight_kind)
        assert err < bound, f"relative error {err:.4g} >= {bound:.4g} on the {weight_kind} weight"
        # The largest entries (the outliers) carry most of the signal: they must survive.
        flat, approx = weight.flatten(), dense.flatten()
        top = flat.abs().topk(max(2, flat.numel() // 200)).indices
        top_err = relative_error(approx[top], flat[top])
        assert top_err < self.extreme_error_bound, (
            f"the largest 0.5% entries of the {weight_kind} weight are off by {top_err:.4g} (relative) "
            f">= {self.extreme_error_bound}: large weights are clipped or lost"
        )

    # -- validation of loaded weights ------------------------------------------------------

    def test_validate_accepts_own_weights(self, spec: QuantizerSpec, qweight: QuantizedWeight) -> None:
        assert spec.validate is not None, (
            f"{spec.name} declares no validate hook: checkpoints of it cannot be checked against their config "
            "(QuantizerSpec(validate=...), see lqmod.types.check_tensor_layout)"
        )
        # As after a trip through a checkpoint: the config is plain JSON data.
        loaded = QuantizedWeight.from_header(_json_normalised(qweight.header()), qweight.tensors)
        validate_qweight(spec, loaded, name="own weight")

    def test_validate_refuses_another_bit_width(
        self, spec: QuantizerSpec, cfg: QuantizerConfig, qweight: QuantizedWeight
    ) -> None:
        # A checkpoint whose manifest was edited to other bits must not load as garbage.
        if spec.validate is None or "bits" not in spec.config_model.model_fields:
            pytest.skip(f"{spec.name}: no validate hook or no 'bits' field")
        tried = 0
        for bits in range(1, 17):
            if bits == getattr(cfg, "bits", None):
                continue
            try:
                variant = validate_config(spec.config_model, {**cfg.model_dump(), "bits": bits}, what=spec.name)
            except ConfigError:
                continue
            edited = dataclasses.replace(qweight, config=_json_normalised(variant.model_dump()))
            with pytest.raises(ValueError):
                spec.validate(edited, variant)
            with pytest.raises(QuantizationError, match="edited layer"):
                validate_qweight(spec, edited, name="edited layer")
            tried += 1
        if not tried:
            pytest.skip(f"{spec.name} offers one bit width only")
