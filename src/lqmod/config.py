"""Pydantic configuration models.

Every config is frozen data with ``extra="forbid"`` so a typo in a field name is an error
that names the field, not a silently ignored setting. Quantizer plug-ins subclass
:class:`QuantizerConfig`; initializer plug-ins subclass :class:`InitializerConfig`; adapter
variants subclass :class:`AdapterConfig`.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "AdapterConfig",
    "ConfigError",
    "FrozenModel",
    "InitializerConfig",
    "LoRAConfig",
    "Plan",
    "PlanEntry",
    "QuantizerConfig",
    "TargetConfig",
    "format_validation_error",
    "validate_config",
]

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """A configuration value was rejected; the message names the field and what is accepted."""


class FrozenModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class QuantizerConfig(FrozenModel):
    """Base of every quantizer's config. ``version`` lets a checkpoint say which schema it used."""

    version: int = CONFIG_VERSION


class InitializerConfig(FrozenModel):
    version: int = CONFIG_VERSION


class AdapterConfig(FrozenModel):
    """Base of every adapter variant's own options (``LoRAConfig.adapter_config``)."""

    version: int = CONFIG_VERSION


class LoRAConfig(FrozenModel):
    """The adapter hyper-parameters shared by every quantizer."""

    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="scale numerator: the update is (alpha / r) B A x")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")
    train_bias: bool = False
    initializer: str = "default"
    initializer_config: dict[str, Any] = Field(default_factory=dict)
    adapter: str = Field("lora", description="registered adapter variant (lqmod plugins lists them)")
    adapter_config: dict[str, Any] = Field(default_factory=dict, description="that variant's own options")
    materialize_in_backward: bool = Field(
        True,
        description="re-materialize the base weight in backward instead of saving it "
        "(the ModuLoRA trick); False keeps the dense weight for autograd, for comparison",
    )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


DEFAULT_EXCLUDE = (r"(^|\.)lm_head$", r"(^|\.)embed", r"(^|\.)classifier$", r"(^|\.)score$")


class TargetConfig(FrozenModel):
    """Which linear layers to quantize, by regular expressions over module names.

    A module is chosen when it matches one ``include`` pattern (``re.search``) and no
    ``exclude`` pattern. The defaults leave the LM head, embeddings and task heads alone.
    """

    include: tuple[str, ...] = (r".*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE

    @field_validator("include", "exclude")
    @classmethod
    def _compiles(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"{p!r} is not a valid regular expression: {exc}") from exc
        return patterns

    def matches(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.include) and not any(
            re.search(p, name) for p in self.exclude
        )


class PlanEntry(FrozenModel):
    """One matrix's choice: a registered quantizer's name and its config (validated later)."""

    quantizer: str
    config: dict[str, Any] = Field(default_factory=dict)


class Plan(FrozenModel):
    """Module name -> quantizer and config; what an allocator writes and ``quantize_model`` reads."""

    version: int = CONFIG_VERSION
    modules: dict[str, PlanEntry]
    summary: dict[str, Any] = Field(default_factory=dict)


def validate_config(model: type[FrozenModel], data: Any, *, what: str) -> Any:
    """Validate ``data`` against ``model`` and turn pydantic's error into a one-paragraph message.

    The message names each offending field, the value given and the constraint, e.g.
    ``nf4 config: field 'blocksize' = 100: Input should be 32, 64, 128, ...``.
    """
    if isinstance(data, model):
        return data
    if isinstance(data, BaseModel):
        data = data.model_dump()
    try:
        return model.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, what=what, fields=list(model.model_fields))) from None


def format_validation_error(exc: ValidationError, *, what: str | None = None, fields: list[str] | None = None) -> str:
    """pydantic's multi-line report as one line: each offending field, the value given, the rule."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        given = err.get("input")
        # pydantic prefixes custom validators' messages with "Value error, "; the rest is the message.
        msg = " ".join(str(err["msg"]).removeprefix("Value error, ").split())
        parts.append(f"field {field!r} = {given!r}: {msg}")
    head = f"{what or exc.title}: "
    tail = f" (fields: {', '.join(fields)})" if fields else ""
    return head + "; ".join(parts) + tail
