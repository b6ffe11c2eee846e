"""Quantizer contract checks of ``materialize``, storage accounting and accuracy."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from lqmod.config import ConfigError, QuantizerConfig, validate_config
from lqmod.quantize import QuantizationError, quantize_weight
from lqmod.testing.comparisons import _bitwise_equal, _json_normalised, relative_error
from lqmod.testing.quantizer_base import QuantizerContractBase, _dtype_id
from lqmod.types import QuantizedWeight, QuantizerSpec


class MaterializeChecks(QuantizerContractBase):
    """``materialize``, storage and accuracy (a part of :class:`~lqmod.testing.QuantizerContract`)."""

    # -- materialize ---------------------------------------------------------------------

    def test_materialize_shape_and_dtype(
        self, spec: QuantizerSpec, qweight: QuantizedWeight, dtype: torch.dtype
    ) -> None:
        dense = spec.materialize(qweight, dtype)
        assert isinstance(dense, torch.Tensor)
        assert tuple(dense.shape) == self.shape, f"materialize returned {tuple(dense.shape)}"
        assert dense.dtype == dtype
        assert dense.device == qweight.device
        assert bool(torch.isfinite(dense).all())
        # The same numbers in every dtype, up to that dtype's rounding (a few ulps).
        reference = spec.materialize(qweight, torch.float32)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(
            dense.float(),
            reference.to(dtype).float(),
            rtol=4 * eps,
            atol=4 * eps * float(reference.abs().max()),
            msg=lambda m: f"materialize({_dtype_id(dtype)}) disagrees with materialize(float32): {m}",
        )

    def test_materialize_is_deterministic_and_pure(
        self, spec: QuantizerSpec, qweight: QuantizedWeight, dtype: torch.dtype
    ) -> None:
        # Backward re-materializes: a second call must give the very same bits, and must not
        # have changed (or handed out) the stored tensors.
        before = {k: v.clone() for k, v in qweight.tensors.items()}
        first = spec.materialize(qweight, dtype)
        second = spec.materialize(qweight, dtype)
        assert _bitwise_equal(first, second), "materialize is not deterministic"
        for k, v in qweight.tensors.items():
            assert _bitwise_equal(v, before[k]), f"materialize modified stored tensor {k!r}"
            assert first.untyped_storage().data_ptr() != v.untyped_storage().data_ptr(), (
                f"materialize returned a view of stored tensor {k!r}: callers may modify it in place"
            )

    def test_lut_format_matches_materialize(self, spec: QuantizerSpec, qweight: QuantizedWeight) -> None:
        # The Triton kernels compute from the LutFormat, the torch path from materialize:
        # the two descriptions of the weight must be the same weight.
        if spec.lut_format is None:
            pytest.skip(f"{spec.name} declares no lut_format")
        fmt = spec.lut_format(qweight)
        if fmt is None:
            pytest.skip(f"{spec.name} has no LutFormat for {qweight.config}")
        from lqmod.kernels.reference import materialize_lut

        assert fmt.shape == qweight.shape
        fmt.check_values()
        dense = spec.materialize(qweight, torch.float32)
        eps = torch.finfo(torch.float32).eps
        torch.testing.assert_close(
            materialize_lut(fmt, torch.float32),
            dense,
            rtol=4 * eps,
            atol=4 * eps * float(dense.abs().max()),
            msg=lambda m: f"materialize_lut(lut_format(qweight)) disagrees with materialize: {m}",
        )

    # -- storage accounting ----------------------------------------------------------------

    def test_bits_per_param_is_exact(self, spec: QuantizerSpec, cfg: QuantizerConfig, qweight: QuantizedWeight) -> None:
        predicted = spec.bits_per_param(cfg, self.shape)
        actual = qweight.bits_per_param()
        breakdown = {k: t.numel() * t.element_size() * 8 for k, t in qweight.tensors.items()}
        assert predicted == actual, (
            f"spec.bits_per_param says {predicted!r}, the stored tensors take {actual!r} "
            f"(bits per tensor: {breakdown}, {qweight.numel} parameters)"
        )
        assert actual > 0

    def test_safetensors_round_trip(self, spec: QuantizerSpec, qweight: QuantizedWeight, tmp_path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        tensors, metadata = qweight.to_safetensors()
        path = tmp_path / "qweight.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        with safe_open(str(path), framework="pt") as f:
            loaded_meta = f.metadata()
        loaded = QuantizedWeight.from_safetensors(load_file(str(path), device=str(qweight.device)), loaded_meta)

        assert loaded.header() == _json_normalised(qweight.header())
        assert loaded.dtype == qweight.dtype
        assert set(loaded.tensors) == set(qweight.tensors)
        for k, v in qweight.tensors.items():
            assert _bitwise_equal(loaded.tensors[k], v), f"tensor {k!r} changed in the round trip"
        assert loaded.bits_per_param() == qweight.bits_per_param()
        for dtype in self.materialize_dtypes:
            assert _bitwise_equal(spec.materialize(loaded, dtype), spec.materialize(qweight, dtype))

    # -- accuracy --------------------------------------------------------------------------

    def test_relative_error_below_bound(
        self, spec: QuantizerSpec, cfg: QuantizerConfig, weight: torch.Tensor, qweight: QuantizedWeight
    ) -> None:
        err = relative_error(spec.materialize(qweight, torch.float32), weight)
        bound = self.relative_error_bound(cfg)
        assert err < bound, f"relative error {err:.4g} >= bound {bound:.4g} for {cfg!r}"

    def test_error_does_not_increase_with_bits(
        self, spec: QuantizerSpec, cfg: QuantizerConfig, weight: torch.Tensor
    ) -> None:
        if "bits" not in spec.config_model.model_fields:
            pytest.skip(f"{spec.config_model.__name__} has no 'bits' field")
        errors: dict[int, float] = {}
        for bits in range(1, 17):
            try:
                variant = validate_config(spec.config_model, {**cfg.model_dump(), "bits": bits}, what=spec.name)
                qw = quantize_weight(spec, weight, variant, self.stats(weight))
            except (ConfigError, QuantizationError):
                continue  # a width this quantizer (or this config) does not offer
            errors[bits] = relative_error(spec.materialize(qw, torch.float32), weight)
        if len(errors) < 2:
            pytest.skip(f"only {sorted(errors)} bit width(s) valid with {cfg!r}")
        widths = sorted(errors)
        for lo, hi in itertools.pairwise(widths):
            # A relative slack of 1e-6 absorbs float noise only; more bits must never be worse.
            assert errors[hi] <= errors[lo] * (1 + 1e-6), f"error rose from {lo} to {hi} bits: {errors}"
        assert errors[widths[-1]] < errors[widths[0]], f"more bits did not help at all: {errors}"
