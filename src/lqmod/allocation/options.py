"""The options an allocator chooses from: every registered quantizer's ``options()``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from importlib import metadata

from lqmod.config import ConfigError
from lqmod.plugins import Registry
from lqmod.types import Option

__all__ = ["collect_options", "option_key", "parse_quantizer_list"]


def option_key(option: Option, registry: Registry | None = None) -> str:
    """A stable identity of an option: quantizer, full config, and the plug-in's distribution version.

    The version is part of it so that a cached error from an older release of a plug-in is
    not reused after an upgrade.
    """
    config = json.dumps(option.config.model_dump(mode="json"), sort_keys=True)
    origin = ""
    if registry is not None:
        dist = registry.origin("lqmod_quantizers", option.quantizer)
        try:
            origin = f"{dist}=={metadata.version(dist)}"
        except (metadata.PackageNotFoundError, ValueError):
            origin = dist
    return f"{option.quantizer}|{config}|{origin}"


def parse_quantizer_list(text: str | Sequence[str] | None) -> list[str] | None:
    """``"nf,rtn"`` or ``["nf", "rtn"]`` -> names; None or "all" -> None (every quantizer)."""
    if text is None:
        return None
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names or names == ["all"]:
        return None
    return names


def collect_options(registry: Registry, quantizers: Iterable[str] | None = None) -> list[Option]:
    """Every option of the chosen (default: all) registered quantizers, each (quantizer, config) once."""
    available = registry.quantizers()
    names = sorted(available) if quantizers is None else list(quantizers)
    for name in names:
        registry.quantizer(name)  # an unknown name lists the registered ones
    options: list[Option] = []
    seen: set[tuple[str, str]] = set()
    for name in names:
        spec = available[name]
        for cfg in spec.options():
            if not isinstance(cfg, spec.config_model):
                raise TypeError(f"quantizer {name!r} listed option {cfg!r}, not a {spec.config_model.__name__}")
            key = (name, json.dumps(cfg.model_dump(mode="json"), sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            options.append(Option(name, cfg))
    if not options:
        raise ConfigError(
            f"quantizers {names} offer no options to allocate over; registered: {', '.join(sorted(available))}"
        )
    return options
