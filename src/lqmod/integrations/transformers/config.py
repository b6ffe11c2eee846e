"""``LqmodConfig``: the ``quantization_config`` of the ``"lqmod"`` method, registered with transformers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers.quantizers import register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

from lqmod.config import Plan, validate_config
from lqmod.integrations.transformers.records import FORMAT_VERSION, METHOD
from lqmod.plugins import get_registry


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
