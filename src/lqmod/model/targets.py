"""Which layers of a model are quantized: linear(-like) modules, target patterns and plans.

GPT-2's ``Conv1D`` stores its weight transposed (in, out); it is read transposed, so the
quantized weight is always (out, in).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lqmod.config import ConfigError, Plan, PlanEntry, TargetConfig, validate_config


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a linear-like module."""
    if isinstance(module, nn.Linear):
        return module.weight.data
    if _is_conv1d(module):
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return weight.data.t()
    raise TypeError(
        f"cannot quantize {type(module).__name__}: supported are torch.nn.Linear and "
        "transformers' Conv1D"
    )


def _layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear-like module, without touching its weight's values."""
    shape = _dense_weight(module).shape
    return int(shape[0]), int(shape[1])


def _is_conv1d(module: nn.Module) -> bool:
    # Checked by name so transformers stays an optional import.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def find_targets(model: nn.Module, targets: TargetConfig) -> list[str]:
    """Names of the linear(-like) modules ``targets`` selects, in module order."""
    return [n for n, m in model.named_modules() if n and _is_linear_like(m) and targets.matches(n)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _resolve_entries(
    model: nn.Module,
    quantizer: str | None,
    config: Any,
    targets: TargetConfig,
    plan: Plan | Mapping[str, Any] | None,
) -> dict[str, PlanEntry]:
    if plan is not None:
        plan = validate_config(Plan, plan, what="plan")
        assert isinstance(plan, Plan)
        names = {n for n, m in model.named_modules() if _is_linear_like(m)}
        unknown = sorted(set(plan.modules) - names)
        if unknown:
            raise ValueError(
                f"plan names {len(unknown)} module(s) that are not linear layers of this model, "
                f"e.g. {unknown[:3]}; the model's linear layers include {sorted(names)[:5]}"
            )
        return dict(plan.modules)
    if quantizer is None:
        raise ValueError("give either a quantizer name or a plan")
    chosen = find_targets(model, targets)
    if not chosen:
        raise ValueError(
            f"no linear layer matches include={targets.include} exclude={targets.exclude}; "
            f"linear layers of this model: {[n for n, m in model.named_modules() if _is_linear_like(m)][:8]}"
        )
    if config is not None and not hasattr(config, "model_dump") and not isinstance(config, Mapping):
        # dict("bits=4") would fail with an unrelated "dictionary update sequence" error.
        raise ConfigError(
            f"config must be a mapping or a QuantizerConfig, got {type(config).__name__} {config!r}; "
            "e.g. config={'bits': 4} (the CLI's 'bits=4' text is parsed by lqmod.cli.parse_kv)"
        )
    cfg = config.model_dump() if hasattr(config, "model_dump") else dict(config or {})
    return {n: PlanEntry(quantizer=quantizer, config=cfg) for n in chosen}
