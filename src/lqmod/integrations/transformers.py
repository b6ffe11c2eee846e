"""The ``"lqmod"`` quantization method for transformers: any lqmod quantizer through ``from_pretrained``.

Importing this module registers :class:`LqmodConfig` and :class:`LqmodHfQuantizer` with
transformers (``register_quantization_config`` / ``register_quantizer``)::

    import lqmod.integrations.transformers  # noqa: F401
    from lqmod.integrations.transformers import LqmodConfig

    model = AutoModelForCausalLM.from_pretrained(
        local_dir, quantization_config=LqmodConfig(quantizer="nf", config={"bits": 4, "blocksize": 64})
    )
    model.save_pretrained(out)              # safetensors + quantization_config in config.json
    model = AutoModelForCausalLM.from_pretrained(out)   # the quantized model again, no original weights

Loading quantizes each selected linear weight as it arrives (one dense layer in memory at a
time) with any registered quantizer, or with a ``plan`` (module -> quantizer + config, e.g.
from ``lqmod plan``). Quantizers that need calibration statistics (OPTQ, QuIP#) cannot
quantize weight by weight: :func:`quantize_model` applies an ``LqmodConfig`` to a loaded model
with statistics the caller computed (``lqmod.calibration``), and the result saves and reloads
the same way.

A saved directory records, per quantized layer, the quantizer, its config and the stored
tensors' shapes and dtypes in ``config.json`` (``quantization_config.layers``), so reloading
builds the quantized layers before any tensor is read. Without lqmod imported, transformers
does not know the method ``"lqmod"``: it logs "Unknown quantization type, got lqmod ... we
will skip the quantization" and would load the model as if it were dense. To make that fail
instead of silently producing a randomly initialised model, each quantized layer's
``<name>.weight`` is saved as a one-element placeholder: plain transformers then stops with a
size-mismatch ``RuntimeError`` naming that weight. The remedy is to
``import lqmod.integrations.transformers`` before ``from_pretrained``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lqmod.config import Plan, PlanEntry, validate_config
from lqmod.integrations.base import quantize_linears, quantize_one, resolve_entries
from lqmod.model import QuantizeReport, replace_module
from lqmod.nn.quantized_linear import QuantizedLinear
from lqmod.plugins import get_registry
from lqmod.types import LayerStats, QuantizedWeight

__all__ = [
    "METHOD",
    "PLACEHOLDER_SUFFIX",
    "LqmodConfig",
    "LqmodHfQuantizer",
    "attach_quantizer",
    "layer_records",
    "quantize_model",
]

METHOD = "lqmod"
FORMAT_VERSION = 1
# Saved in place of a quantized layer's dense weight (see the module docstring).
PLACEHOLDER_SUFFIX = ".weight"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the lqmod quantization config")
    return dtype


def layer_records(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per QuantizedLinear: its quantized weight's header, the tensors' shapes and dtypes, and
    whether it has a bias: what rebuilding the empty layer before loading needs."""
    records: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            qw = module.qweight
            records[name] = {
                "header": qw.header(),
                "tensors": {k: [list(v.shape), _dtype_name(v.dtype)] for k, v in sorted(qw.tensors.items())},
                "bias": module.bias is not None,
                "origin": module.origin,
                "compute_dtype": _dtype_name(module.compute_dtype),
            }
    return records


@register_quantization_config(METHOD)
class LqmodConfig(QuantizationConfigMixin):
    """Quantize with lqmod: one ``quantizer`` + ``config`` for every selected linear layer, or a ``plan``.

    * ``quantizer``: a registered lqmod quantizer name (``lqmod plugins`` lists them);
    * ``config``: that quantizer's config as a dict (validated on load, e.g. ``{"bits": 4}``);
    * ``targets``: ``{"include": [regex...], "exclude": [regex...]}`` over module names
      (lqmod's defaults keep the LM head and embeddings dense);
    * ``plan``: ``{"modules": {name: {"quantizer": ..., "config": {...}}}}`` (e.g. from
      ``lqmod plan``), instead of ``quantizer``/``config``/``targets``;
    * ``modules_to_not_convert``: module names (or name prefixes) never quantized, besides
      the ones transformers keeps (tied and output embeddings);
    * ``calibration``: for quantizers that need statistics (OPTQ's and QuIP#'s Hessians, a
      Fisher for ``lq-fisher``): ``{"text": "wikitext2" | "ptb" | a UTF-8 file, "n": 16,
      "length": 256, "sequential": False, "tokenizer": None}``. The model then loads dense,
      the statistics are taken on ``n`` windows of ``length`` tokens (``sequential``:
      block by block on already quantized inputs, GPTQ style), and the layers are quantized
      before ``from_pretrained`` returns. ``tokenizer`` defaults to the model's directory;
    * ``layers``: filled in after quantization (the per-layer records that let a saved
      directory reload); leave it ``None``.
    """

    def __init__(
        self,
        quantizer: str | None = "nf",
        config: Mapping[str, Any] | None = None,
        *,
        targets: Mapping[str, Any] | None = None,
        plan: Mapping[str, Any] | None = None,
        modules_to_not_convert: list[str] | None = None,
        calibration: Mapping[str, Any] | None = None,
        layers: Mapping[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(
                f"LqmodConfig got unknown field(s) {sorted(kwargs)}; accepted: quantizer, config, targets, plan, "
                "modules_to_not_convert, calibration, layers"
            )
        if int(format_version) > FORMAT_VERSION:
            raise ValueError(
                f"this lqmod reads quantization format version {FORMAT_VERSION}, the model was saved with "
                f"{format_version}: upgrade lqmod"
            )
        self.quant_method = METHOD  # type: ignore[assignment]  # a registered custom method
        self.format_version = int(format_version)
        self.quantizer = quantizer
        self.config = dict(config or {})
        self.targets = None if targets is None else {k: list(v) for k, v in dict(targets).items()}
        self.plan = None if plan is None else _plan_dict(plan)
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.calibration = None if calibration is None else _calibration(calibration)
        self.layers = None if layers is None else dict(layers)
        if self.plan is None and self.quantizer is None and self.layers is None:
            raise ValueError("LqmodConfig needs a quantizer name or a plan")
        if self.layers is None:
            self._check()

    def _check(self) -> None:
        """Fail at construction, not halfway through loading: names and configs must be valid."""
        registry = get_registry()
        if self.plan is not None:
            plan = validate_config(Plan, self.plan, what="LqmodConfig plan")
            for name, entry in plan.modules.items():
                spec = registry.quantizer(entry.quantizer)
                validate_config(spec.config_model, entry.config, what=f"{entry.quantizer} config for {name}")
        else:
            assert self.quantizer is not None
            spec = registry.quantizer(self.quantizer)
            validate_config(spec.config_model, self.config, what=f"{self.quantizer} config")

    @property
    def is_prequantized(self) -> bool:
        return self.layers is not None


CALIBRATION_DEFAULTS: dict[str, Any] = {"text": None, "n": 16, "length": 256, "sequential": False, "tokenizer": None}


def _calibration(cal: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(cal) - set(CALIBRATION_DEFAULTS))
    if unknown:
        raise ValueError(
            f"LqmodConfig calibration got unknown field(s) {unknown}; accepted: {', '.join(CALIBRATION_DEFAULTS)}"
        )
    out = {**CALIBRATION_DEFAULTS, **dict(cal)}
    if not out["text"]:
        raise ValueError("LqmodConfig calibration needs 'text': 'wikitext2', 'ptb' or the path of a UTF-8 file")
    if int(out["n"]) < 1 or int(out["length"]) < 2:
        raise ValueError(
            f"LqmodConfig calibration needs n >= 1 and length >= 2, got n={out['n']} length={out['length']}"
        )
    return out


def _plan_dict(plan: Mapping[str, Any] | Plan) -> dict[str, Any]:
    if isinstance(plan, Plan):
        return plan.model_dump(mode="json")
    return dict(plan)


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


@register_quantizer(METHOD)
class LqmodHfQuantizer(HfQuantizer):
    """transformers' side of the ``"lqmod"`` method (see the module docstring)."""

    requires_calibration = False
    quantization_config: LqmodConfig

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        if not isinstance(quantization_config, LqmodConfig):
            raise TypeError(f"the lqmod quantizer needs an LqmodConfig, got {type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)
        self.entries: dict[str, PlanEntry] = {}
        self.report = QuantizeReport()
        # With calibration the weights load dense and are quantized after loading.
        self.deferred = False

    # -- what transformers asks -------------------------------------------------------------

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("lqmod quantized layers cannot be offloaded to disk; use a device_map without 'disk'")
        if self.pre_quantized and not self.quantization_config.is_prequantized:
            raise ValueError(
                "the model's config.json has an lqmod quantization_config without per-layer records "
                "('layers'): it was not saved by lqmod's save path; re-quantize it from the dense weights"
            )

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        module_name, _, param = param_name.rpartition(".")
        return not self.pre_quantized and not self.deferred and param == "weight" and module_name in self.entries

    def get_quantize_ops(self) -> Any:
        return _QuantizeOnLoad(self)

    # -- before the weights load ------------------------------------------------------------

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        skip = self.get_modules_to_not_convert(
            model, self.quantization_config.modules_to_not_convert or None, model._keep_in_fp32_modules,
            add_default_skips=True,
        )
        if self.pre_quantized:
            self._build_quantized_skeleton(model)
            return
        cfg = self.quantization_config
        entries = resolve_entries(model, cfg.quantizer, cfg.config, targets=cfg.targets, plan=cfg.plan)
        if cfg.plan is None:
            entries = {n: e for n, e in entries.items() if not _skipped(n, skip)}
        registry = get_registry()
        needing = sorted({e.quantizer for e in entries.values() if registry.quantizer(e.quantizer).needs})
        if needing and cfg.calibration is None:
            raise ValueError(
                f"quantizer(s) {needing} need calibration statistics, which weight-by-weight loading cannot "
                "provide: name calibration text (LqmodConfig(..., calibration={'text': 'wikitext2', 'n': 16})), "
                "or load the model dense, compute statistics with lqmod.calibration and call "
                "lqmod.integrations.transformers.quantize_model(model, LqmodConfig(...), stats=...)"
            )
        self.deferred = cfg.calibration is not None
        for name, entry in entries.items():
            spec = registry.quantizer(entry.quantizer)
            validate_config(spec.config_model, entry.config, what=f"{entry.quantizer} config for {name}")
        self.entries = entries

    def _build_quantized_skeleton(self, model: Any) -> None:
        """Empty (meta) QuantizedLinear layers shaped like the saved ones, so the stored tensors load into them."""
        records = self.quantization_config.layers or {}
        registry = get_registry()
        for name, record in records.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"the lqmod quantization config names layer {name!r}, which this model lacks"
                ) from None
            header = record["header"]
            spec = registry.quantizer(header["quantizer"])
            tensors = {
                k: torch.empty(tuple(shape), dtype=_dtype(dtype), device="meta")
                for k, (shape, dtype) in record["tensors"].items()
            }
            qweight = QuantizedWeight.from_header(header, tensors)
            bias = torch.empty(qweight.shape[0], device="meta") if record.get("bias") else None
            layer = QuantizedLinear(qweight, spec, bias, compute_dtype=_dtype(record.get("compute_dtype", "float32")))
            layer.origin = str(record.get("origin", "linear"))
            old_bias = getattr(old, "bias", None)
            if layer.bias is not None and isinstance(old_bias, nn.Parameter):
                # The model's own (meta) bias carries the dtype the model is loaded in.
                layer.bias = old_bias
                old_bias.requires_grad_(False)
            replace_module(model, name, layer)
        # The placeholders saved in place of the dense weights are expected, not news.
        patterns = {re.escape(name + PLACEHOLDER_SUFFIX) + "$" for name in records}
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | patterns

    # -- after ----------------------------------------------------------------------------

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        for module in model.modules():
            if isinstance(module, QuantizedLinear) and module.bias is not None:
                module.bias.requires_grad_(False)
        if self.deferred:
            self.report = _calibrate_and_quantize(model, self.quantization_config, self.entries)
        if not self.pre_quantized:
            left = [n for n in self.entries if not isinstance(model.get_submodule(n), QuantizedLinear)]
            if left:
                raise RuntimeError(
                    f"{len(left)} selected layer(s) got no weight from the checkpoint and were not quantized, e.g. "
                    f"{left[:3]}"
                )
            self.quantization_config.layers = layer_records(model)
        return model

    def get_state_dict_and_metadata(self, model: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        wrapped = [n for n in layer_records(model) if n.endswith(".base_layer")]
        if wrapped:
            raise ValueError(
                f"{len(wrapped)} quantized layer(s) carry PEFT adapters (e.g. {wrapped[0]!r}): save the adapters "
                "with peft_model.save_pretrained() and the base model before get_peft_model, or merge first "
                "(peft_model.merge_and_unload(), lqmod.integrations.merge.merge_to_dense / merge_and_requantize)"
            )
        state = model.state_dict()
        # Keep config.json's per-layer records in step with the layers (a merge may have re-quantized some).
        self.quantization_config.layers = layer_records(model)
        for name in self.quantization_config.layers:
            state[name + PLACEHOLDER_SUFFIX] = torch.zeros(1, dtype=torch.uint8)
        return state, {"lqmod_format": str(FORMAT_VERSION)}

    def _dequantize(self, model: Any, dtype: torch.dtype | None = None) -> Any:
        from lqmod.integrations.merge import dequantize_model

        return dequantize_model(model, dtype=dtype or torch.float32)


class _QuantizeOnLoad(ConversionOps):
    """transformers' conversion op for one selected weight: quantize it, swap the layer in."""

    def __init__(self, quantizer: LqmodHfQuantizer) -> None:
        self.hf_quantizer = quantizer

    def convert(  # type: ignore[override]
        self,
        input_dict: dict[str, Any],
        *,
        full_layer_name: str | None = None,
        model: nn.Module | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        assert model is not None
        out: dict[str, torch.Tensor] = {}
        registry = get_registry()
        for key, value in input_dict.items():
            weight = value[0] if isinstance(value, list) else value
            name = key.removesuffix(".weight")
            entry = self.hf_quantizer.entries[name]
            old = model.get_submodule(name)
            dense = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            dense.weight = nn.Parameter(weight, requires_grad=False)
            layer, row = quantize_one(dense, registry.quantizer(entry.quantizer), entry.config, None, name=name)
            old_bias = getattr(old, "bias", None)
            if isinstance(old_bias, nn.Parameter):
                # Loaded already or still to come: either way it belongs to the new layer.
                layer.bias = old_bias
            replace_module(model, name, layer)
            self.hf_quantizer.report.layers.append(row)
            if missing_keys is not None:
                missing_keys.discard(key)
        return out


def _model_kind(model: Any) -> str:
    get_out = getattr(model, "get_output_embeddings", None)
    return "causal-lm" if callable(get_out) and get_out() is not None else "encoder"


def _calibration_batches(model: Any, cal: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    from lqmod.calibration.text import calibration_batches

    where = cal.get("tokenizer") or getattr(model.config, "name_or_path", None)
    if not where:
        raise ValueError(
            "LqmodConfig calibration: the model has no directory to read a tokenizer from; set 'tokenizer'"
        )
    tokenizer = AutoTokenizer.from_pretrained(where)
    batches = calibration_batches(
        tokenizer, _model_kind(model), str(cal["text"]), int(cal["n"]), length=int(cal["length"])
    )
    device = next(model.parameters()).device
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def _calibrate_and_quantize(
    model: Any,
    cfg: LqmodConfig,
    entries: Mapping[str, PlanEntry],
    batches: list[dict[str, torch.Tensor]] | None = None,
    stats: Mapping[str, LayerStats] | None = None,
) -> QuantizeReport:
    """Statistics on calibration batches for the layers whose quantizer needs them, then quantization."""
    from lqmod.calibration import collect_hessians, diagonal_fisher, fisher_stats, quantize_model_sequential
    from lqmod.integrations.base import to_quantized_linears

    if batches is None:
        assert cfg.calibration is not None
        batches = _calibration_batches(model, cfg.calibration)
    registry = get_registry()
    needs = {n: registry.quantizer(e.quantizer).needs for n, e in entries.items()}
    given = dict(stats or {})
    fisher_names = [n for n, nd in needs.items() if "fisher" in nd and getattr(given.get(n), "fisher", None) is None]
    if fisher_names:
        given = fisher_stats(diagonal_fisher(model, fisher_names, batches, progress=False), given)
    plan = {"modules": {n: e.model_dump(mode="json") for n, e in entries.items()}}
    if cfg.calibration is not None and cfg.calibration.get("sequential"):
        # lqmod's GPTQ-style driver attaches LoRA adapters at their initial value (B = 0);
        # they are dropped right after, leaving the quantized bases.
        report = quantize_model_sequential(
            model, plan=plan, batches=batches, lora={"r": 1}, stats=given, progress=False
        )
        to_quantized_linears(model)
        return report
    hessian_names = [n for n, nd in needs.items() if "hessian" in nd and getattr(given.get(n), "hessian", None) is None]
    if hessian_names:
        for name, st in collect_hessians(model, hessian_names, batches, progress=False).items():
            old = given.get(name)
            given[name] = st if old is None else LayerStats(
                hessian=st.hessian, n_tokens=st.n_tokens, fisher=old.fisher, act_absmean=st.act_absmean
            )
    return quantize_linears(model, None, None, plan=plan, stats=given)


def quantize_model(
    model: Any,
    quantization_config: LqmodConfig,
    *,
    stats: Mapping[str, LayerStats] | None = None,
    batches: list[dict[str, torch.Tensor]] | None = None,
    progress: bool = False,
) -> QuantizeReport:
    """Apply ``quantization_config`` to an already loaded transformers model, in place.

    The route for quantizers that need calibration statistics (``stats``: module name ->
    :class:`~lqmod.types.LayerStats`, e.g. from ``lqmod.calibration.collect_hessians``; or
    ``batches``, forward-call keyword arguments the missing statistics are computed on; or
    the config's ``calibration`` text, read with the model's tokenizer), and for models
    loaded another way (a GGUF file, which transformers will not combine with a
    quantization config). The model then saves with ``save_pretrained`` and reloads with
    ``from_pretrained`` exactly as if it had been quantized on load.
    """
    if not isinstance(quantization_config, LqmodConfig):
        raise TypeError(f"expected an LqmodConfig, got {type(quantization_config).__name__}")
    existing = getattr(model, "hf_quantizer", None)
    if existing is not None:
        qm = existing.quantization_config.quant_method
        method = str(getattr(qm, "value", qm))
        # transformers loads a GGUF file through a quantizer that dequantizes every tensor:
        # those weights are dense and may be quantized again. Anything else already is.
        if method != "gguf":
            raise ValueError(f"the model is already quantized (method {method!r}); load it dense first")
    cfg = quantization_config
    skip = HfQuantizer.get_modules_to_not_convert(
        model, cfg.modules_to_not_convert or None, getattr(model, "_keep_in_fp32_modules", None), add_default_skips=True
    )
    entries = resolve_entries(model, cfg.quantizer, cfg.config, targets=cfg.targets, plan=cfg.plan)
    if cfg.plan is None:
        entries = {n: e for n, e in entries.items() if not _skipped(n, skip)}
    registry = get_registry()
    if batches is not None or (cfg.calibration is not None and any(
        registry.quantizer(e.quantizer).needs for e in entries.values()
    )):
        report = _calibrate_and_quantize(model, cfg, entries, batches, stats)
    else:
        plan = {"modules": {n: e.model_dump(mode="json") for n, e in entries.items()}}
        report = quantize_linears(model, None, None, plan=plan, stats=stats, progress=progress)
    attach_quantizer(model, cfg).report = report
    return report


def attach_quantizer(model: Any, quantization_config: LqmodConfig | None = None) -> LqmodHfQuantizer:
    """Mark a model holding QuantizedLinear layers as an ``"lqmod"``-quantized transformers model,
    so ``save_pretrained`` writes the quantized tensors and the config that reloads them."""
    cfg = quantization_config or LqmodConfig(quantizer=None, layers={})
    cfg.layers = layer_records(model)
    if not cfg.layers:
        raise ValueError("the model has no lqmod QuantizedLinear layers")
    quantizer = LqmodHfQuantizer(cfg, pre_quantized=False)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = METHOD
    model.config.quantization_config = cfg
    return quantizer
