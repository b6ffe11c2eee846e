"""The quantizer contract: what every quantizer plug-in must guarantee, as pytest tests.

A plug-in author subclasses :class:`QuantizerContract` in their own test suite::

    from lqmod.testing import QuantizerContract

    class TestMyQuantizerContract(QuantizerContract):
        quantizer = "mine"                             # the registered name
        configs = [{"bits": 4}, {"bits": 2, "group_size": 32}]
        shape = (48, 256)                              # optional: (out_features, in_features)
        max_relative_error = 0.5                       # optional: or override relative_error_bound()

Every ``test_*`` method that takes ``config`` runs once per entry of ``configs`` (dicts or
config instances); those taking ``dtype`` run once per entry of ``materialize_dtypes``;
those taking ``weight_kind`` once per hard test weight (``"outliers"``: a few entries 25-60
standard deviations out; ``"heavy-tailed"``: Student-t with 2 degrees of freedom;
``"real"``: a block of a trained all-MiniLM-L6-v2 matrix, skipped where that model is not
installed).

Beyond shape, dtype and storage bookkeeping, the suite checks that ``quantize`` is
deterministic (twice the same call, the same bits) and, unless
``thread_count_independent = False`` says otherwise (and the plug-in documents it),
independent of ``torch.set_num_threads``; and that the ``validate`` hook accepts the
quantizer's own output and refuses it under a config with another bit width.
Quantizers that need calibration statistics override :meth:`QuantizerContract.stats`; a
quantizer that is not installed through an entry point can override
:meth:`QuantizerContract.get_spec`.

The checks are written as plain methods taking explicit arguments (the fixtures only build
those arguments), so they can also be called directly, e.g. to show that a deliberately
broken quantizer fails them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from pydantic import BaseModel, ValidationError
from torch import nn

import lqmod
from lqmod.config import ConfigError, LoRAConfig, QuantizerConfig, validate_config
from lqmod.nn.lora_linear import LoRALinear
from lqmod.quantize import QuantizationError, quantize_weight, validate_qweight
from lqmod.types import LayerStats, Option, QuantizedWeight, QuantizerSpec

__all__ = ["QuantizerContract", "dense_sized_saved_tensors", "relative_error"]

ConfigLike = Mapping[str, Any] | QuantizerConfig


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact||_F / ||exact||_F``, computed in float64."""
    exact64 = exact.double()
    return float((approx.double() - exact64).norm() / exact64.norm())


def dense_sized_saved_tensors(
    module: nn.Module, x: torch.Tensor, shape: tuple[int, int]
) -> tuple[torch.Tensor, list[tuple[tuple[int, ...], torch.dtype]]]:
    """Run ``module(x)`` and list the floating-point tensors autograd saved for backward that
    are as large as a dense ``shape`` weight (or larger).

    A materialize-in-backward layer saves only the quantized tensors, the (small) adapter
    and its inputs; a float tensor with ``out * in`` elements means the dense weight (or a
    flattened copy of it) is being kept alive until backward. The caller must keep ``x``
    and the adapter smaller than that for the answer to mean anything.
    """
    numel = shape[0] * shape[1]
    found: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.numel() >= numel:
            found.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    return out, found


def _config_id(config: ConfigLike) -> str:
    data = config.model_dump(exclude_unset=True) if isinstance(config, BaseModel) else dict(config)
    return ",".join(f"{k}={v}" for k, v in sorted(data.items())) or "defaults"


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (unlike ``torch.equal``, NaN == NaN and -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def _prefixed(prefix: str) -> Callable[[str], str]:
    # assert_close's msg callable; a factory, so each message binds its own prefix.
    return lambda message: f"{prefix}: {message}"


def _json_normalised(value: Any) -> Any:
    # What a header looks like after a trip through a checkpoint (tuples become lists ...).
    return json.loads(json.dumps(value, sort_keys=True))


WEIGHT_KINDS = ("outliers", "heavy-tailed", "real")
#: The MiniLM matrix the "real" weight is cut from (384 x 1536: fits most test shapes).
REAL_WEIGHT = "encoder.layer.0.output.dense.weight"


@functools.lru_cache(maxsize=4)
def _real_matrix(name: str) -> torch.Tensor | None:
    """A trained weight matrix of all-MiniLM-L6-v2 (via :mod:`lqmod.hf`), or None if absent."""
    try:
        from safetensors import safe_open

        from lqmod.hf import resolve_model

        path = resolve_model("minilm").path / "model.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor(name).float() if name in fh.keys() else None  # noqa: SIM118
    except (ImportError, FileNotFoundError, OSError):
        return None


class QuantizerContract:
    """Subclass in a ``Test*`` class and set :attr:`quantizer` (and usually :attr:`configs`)."""

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

    # -- the LoRA layer --------------------------------------------------------------------

    def test_lora_linear_trains(self, spec: QuantizerSpec, qweight: QuantizedWeight) -> None:
        out_f, in_f = self.shape
        # Keep the adapter and the batch smaller than the weight, so that any saved float
        # tensor with out*in elements can only be the dense weight.
        r = max(1, min(4, min(out_f, in_f) // 2))
        tokens = max(1, min(6, out_f // 2))
        lora = LoRAConfig.model_validate({"r": r, "alpha": 2.0 * r})
        gen = torch.Generator().manual_seed(self.seed + 1)
        a0 = torch.randn(r, in_f, generator=gen) / in_f**0.5
        b0 = torch.randn(out_f, r, generator=gen) * 0.1  # non-zero, so lora_A gets a gradient too
        layer = LoRALinear(qweight, spec, lora, lora_a=a0, lora_b=b0).to(self.device)
        stored = {k: v.clone() for k, v in qweight.tensors.items()}

        trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
        assert trainable == {"adapter.lora_A", "adapter.lora_B"}, f"trainable parameters: {sorted(trainable)}"

        x = torch.randn(tokens, in_f, generator=gen).to(self.device).requires_grad_(True)
        y, dense_saved = dense_sized_saved_tensors(layer, x, self.shape)
        assert not dense_saved, f"tensors as large as the dense weight were saved for backward: {dense_saved}"

        # Output and every gradient against a plain dense computation with the same weight.
        w = spec.materialize(qweight, torch.float32).to(self.device)
        xr = x.detach().clone().requires_grad_(True)
        ar = a0.to(self.device).requires_grad_(True)
        br = b0.to(self.device).requires_grad_(True)
        yr = xr @ w.T + lora.scaling * (xr @ ar.T) @ br.T
        torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-5)
        g = torch.randn(y.shape, generator=gen).to(self.device)
        y.backward(g)
        yr.backward(g)
        for got, want, what in ((x.grad, xr.grad, "x"), (layer.lora_A.grad, ar.grad, "lora_A"),
                                (layer.lora_B.grad, br.grad, "lora_B")):  # fmt: skip
            assert got is not None, f"no gradient reached {what}"
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=_prefixed(f"grad {what}"))
        for name, buf in layer.named_buffers():
            assert not buf.requires_grad, f"buffer {name} requires grad"
            assert buf.grad is None, f"buffer {name} received a gradient"

        # A few steps towards a target the adapter can reach: the loss must fall.
        with torch.no_grad():
            target = (
                y.detach() + 0.5 * (x.detach() @ torch.randn(in_f, out_f, generator=gen).to(self.device)) / in_f**0.5
            )
        opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=0.02)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(layer(x.detach()), target)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < 0.7 * losses[0], f"training did not reduce the loss: {losses[0]:.4g} -> {losses[-1]:.4g}"
        for k, v in layer.base.qweight().tensors.items():
            assert _bitwise_equal(v, stored[k].to(v.device)), f"training changed stored tensor {k!r}"

    # -- allocator options -------------------------------------------------------------------

    def test_options_validate(self, spec: QuantizerSpec) -> None:
        opts = list(spec.options())
        labels = []
        for opt in opts:
            assert isinstance(opt, spec.config_model), f"option {opt!r} is not a {spec.config_model.__name__}"
            assert validate_config(spec.config_model, opt.model_dump(), what=spec.name) == opt
            labels.append(Option(spec.name, opt).label)
        duplicates = sorted({lbl for lbl in labels if labels.count(lbl) > 1})
        assert not duplicates, f"options listed twice: {duplicates}"

    def test_options_bits_per_param_is_exact(self, spec: QuantizerSpec) -> None:
        opts = list(spec.options())
        if not opts:
            pytest.skip(f"{spec.name} offers no options")
        weight = self.make_weight()
        stats = self.stats(weight)
        checked = 0
        for opt in opts:
            try:
                predicted = spec.bits_per_param(opt, self.shape)
            except QuantizationError:
                continue  # the option does not fit this shape; an allocator skips it likewise
            actual = quantize_weight(spec, weight, opt, stats).bits_per_param()
            assert predicted == actual, f"{Option(spec.name, opt).label}: predicted {predicted!r}, stored {actual!r}"
            checked += 1
        assert checked, f"no option fits shape {self.shape}; choose a `shape` that some options fit"
