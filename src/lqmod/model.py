"""Quantize a whole model: swap chosen linear layers for :class:`LoRALinear`, layer by layer.

Works on any ``torch.nn.Module``; Hugging Face transformers models (Llama, BERT, GPT-2 ...)
are the main users. GPT-2's ``Conv1D`` stores its weight transposed (in, out); it is handled
by transposing, so the quantized weight is always (out, in).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lqmod.config import ConfigError, LoRAConfig, Plan, PlanEntry, TargetConfig, validate_config
from lqmod.nn.lora_linear import LoRALinear
from lqmod.plugins import Registry, get_registry
from lqmod.quantize import QuantizationError, check_materialized, quantize_weight, relative_error
from lqmod.types import AdapterSpec, LayerStats, QuantizedWeight, QuantizerSpec

__all__ = [
    "LayerQuantizer",
    "LayerReport",
    "QuantizeReport",
    "build_lora_linear",
    "convert_adapters",
    "find_targets",
    "iter_lora_layers",
    "lora_parameters",
    "missing_stats_message",
    "quantize_model",
    "replace_module",
    "set_adapters_enabled",
    "size_bytes",
]


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, int]
    quantizer: str
    config: dict[str, Any]
    bits_per_param: float
    rel_error: float


@dataclass
class QuantizeReport:
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    @property
    def bits_per_param(self) -> float:
        total = sum(r.bits_per_param * r.shape[0] * r.shape[1] for r in self.layers)
        return total / max(self.n_params, 1)


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


def build_lora_linear(
    qweight: QuantizedWeight,
    spec: QuantizerSpec,
    lora: LoRAConfig,
    *,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
    adapter: AdapterSpec | None = None,
) -> LoRALinear:
    return LoRALinear(qweight, spec, lora, lora_a=lora_a, lora_b=lora_b, bias=bias, adapter=adapter)


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


def missing_stats_message(name: str, quantizer: str, missing: Sequence[str], *, initializer: str | None = None) -> str:
    """The error for a layer whose quantizer (or LoRA initializer) needs statistics nobody supplied: what and how."""
    how = {
        "hessian": "lqmod.calibration.collect_hessians(model, names, batches)",
        "fisher": "lqmod.calibration.fisher_stats(lqmod.calibration.diagonal_fisher(model, names, batches))",
    }
    who = f"quantizer {quantizer!r}" if initializer is None else f"LoRA initializer {initializer!r}"
    recipes = "; ".join(f"{m!r}: {how.get(m, 'a LayerStats field ' + repr(m))}" for m in missing)
    return (
        f"layer {name!r}: {who} needs calibration statistics {list(missing)} that were not "
        f"supplied for this layer. Compute them on real text and pass stats={{name: LayerStats}} to "
        f"quantize_model ({recipes}), or call lqmod.calibration.quantize_model_sequential(..., batches=...) "
        "for Hessians; on the command line add --calib-text wikitext2 --n-calib N"
    )


def _missing_stats(needs: frozenset[str], layer_stats: LayerStats | None) -> list[str]:
    return [s for s in sorted(needs) if layer_stats is None or getattr(layer_stats, s, None) is None]


class LayerQuantizer:
    """The per-layer machinery of :func:`quantize_model`, resolved and checked once.

    Building it validates every name and config (the model is untouched if that fails);
    :meth:`quantize` then swaps one layer at a time, so a driver (e.g. the sequential,
    block-by-block calibration in :mod:`lqmod.calibration`) can interleave statistics
    gathering with quantization while producing exactly what ``quantize_model`` would.
    """

    def __init__(
        self,
        model: nn.Module,
        quantizer: str | None,
        config: Any,
        *,
        lora: LoRAConfig | Mapping[str, Any] | None,
        targets: TargetConfig | Mapping[str, Any] | None,
        plan: Plan | Mapping[str, Any] | None,
        registry: Registry | None,
        seed: int,
    ) -> None:
        registry = registry or get_registry()
        self.model = model
        self.lora_cfg: LoRAConfig = validate_config(LoRAConfig, lora, what="lora config")
        target_cfg: TargetConfig = validate_config(TargetConfig, targets, what="targets")
        self.entries = _resolve_entries(model, quantizer, config, target_cfg, plan)
        self.init_spec = registry.initializer(self.lora_cfg.initializer)
        self.init_cfg = validate_config(
            self.init_spec.config_model,
            self.lora_cfg.initializer_config,
            what=f"{self.init_spec.name} initializer config",
        )
        # Resolve every quantizer and config before touching the model: a bad name or value fails
        # fast and leaves the model as it was.
        self.specs = {name: registry.quantizer(e.quantizer) for name, e in self.entries.items()}
        for name, e in self.entries.items():
            validate_config(self.specs[name].config_model, e.config, what=f"{e.quantizer} config for {name}")
        self.adapter_spec = registry.adapter(self.lora_cfg.adapter)
        adapter_cfg = validate_config(
            self.adapter_spec.config_model,
            self.lora_cfg.adapter_config,
            what=f"{self.adapter_spec.name} adapter config",
        )
        if self.adapter_spec.check is not None:
            for name in self.entries:
                try:
                    self.adapter_spec.check(_layer_shape(model.get_submodule(name)), self.lora_cfg, adapter_cfg)
                except ValueError as exc:
                    raise ValueError(f"layer {name!r}: {exc}") from None
        self.generator = torch.Generator().manual_seed(seed)
        self._originals: dict[str, nn.Module] = {}
        self._requires_grad: dict[nn.Parameter, bool] = {}

    def needs(self, name: str) -> frozenset[str]:
        """Statistics layer ``name`` needs: its quantizer's and the LoRA initializer's."""
        return self.specs[name].needs | self.init_spec.needs

    def _missing_message(self, name: str, missing: Sequence[str]) -> str:
        # Name the initializer when it, not the quantizer, asks for a missing statistic.
        by_init = None if set(missing) <= self.specs[name].needs else self.init_spec.name
        return missing_stats_message(name, self.specs[name].name, missing, initializer=by_init)

    def check_stats(self, stats: Mapping[str, LayerStats] | None, names: Sequence[str] | None = None) -> None:
        """Raise a clear error naming the first layer whose quantizer lacks the statistics it needs."""
        for name in self.entries if names is None else names:
            missing = _missing_stats(self.needs(name), stats.get(name) if stats else None)
            if missing:
                raise QuantizationError(self._missing_message(name, missing))

    def freeze(self) -> None:
        """Freeze every parameter, remembering the flags so :meth:`rollback` can restore them."""
        for p in self.model.parameters():
            self._requires_grad.setdefault(p, p.requires_grad)
            p.requires_grad_(False)

    def build(self, name: str, layer_stats: LayerStats | None) -> tuple[LoRALinear, LayerReport]:
        """Quantize layer ``name`` and attach its adapters, *without* touching the model."""
        model, spec = self.model, self.specs[name]
        module = model.get_submodule(name)
        missing = _missing_stats(self.needs(name), layer_stats)
        if missing:
            raise QuantizationError(self._missing_message(name, missing))
        weight = _dense_weight(module)
        qweight = quantize_weight(
            spec, weight, self.entries[name].config, layer_stats, name=name, check_finite=False
        )
        init = self.init_spec.initialize(
            weight=weight,
            qweight=qweight,
            materialize=spec.materialize,
            lora=self.lora_cfg,
            config=self.init_cfg,
            stats=layer_stats,
            generator=self.generator,
        )
        if init.qweight is not None:
            # The layer keeps the spec it was quantized with: a replacement base must be the
            # same quantizer's weight of the same shape, or it would be materialized wrongly.
            if init.qweight.quantizer != spec.name or tuple(init.qweight.shape) != tuple(qweight.shape):
                raise ValueError(
                    f"{name}: initializer {self.init_spec.name!r} returned a replacement base of quantizer "
                    f"{init.qweight.quantizer!r} shape {tuple(init.qweight.shape)}; this layer needs a "
                    f"{spec.name!r} weight of shape {tuple(qweight.shape)}"
                )
            qweight = init.qweight
        bias = getattr(module, "bias", None)
        new = build_lora_linear(
            qweight.to(weight.device),
            spec,
            self.lora_cfg,
            lora_a=init.lora_a.to(weight.device),
            lora_b=init.lora_b.to(weight.device),
            bias=None if bias is None else bias.data,
            adapter=self.adapter_spec,
        )
        with torch.no_grad():
            deq = spec.materialize(qweight, torch.float32)
            # A weight that materializes inf/NaN would train and save as garbage: refuse it here.
            check_materialized(spec, qweight, deq, name=name)
            err = relative_error(deq, weight)
        new.origin = "conv1d" if _is_conv1d(module) else "linear"
        report = LayerReport(
            name,
            (qweight.shape[0], qweight.shape[1]),
            spec.name,
            qweight.config,
            qweight.bits_per_param(),
            err,
        )
        return new, report

    def swap(self, name: str, new: nn.Module) -> None:
        """Put ``new`` in place of layer ``name``, remembering the original for :meth:`rollback`."""
        self._originals.setdefault(name, self.model.get_submodule(name))
        replace_module(self.model, name, new)

    def quantize(self, name: str, layer_stats: LayerStats | None) -> LayerReport:
        """Quantize layer ``name``, attach its adapters and swap it into the model."""
        new, report = self.build(name, layer_stats)
        self.swap(name, new)
        return report

    def rollback(self) -> None:
        """Undo every :meth:`swap` and :meth:`freeze`: the model is as it was before."""
        for name, original in reversed(list(self._originals.items())):
            replace_module(self.model, name, original)
        self._originals.clear()
        for p, flag in self._requires_grad.items():
            p.requires_grad_(flag)
        self._requires_grad.clear()


def quantize_model(
    model: nn.Module,
    quantizer: str | None = "nf",
    config: Any = None,
    *,
    lora: LoRAConfig | Mapping[str, Any] | None = None,
    targets: TargetConfig | Mapping[str, Any] | None = None,
    plan: Plan | Mapping[str, Any] | None = None,
    stats: Mapping[str, LayerStats] | None = None,
    registry: Registry | None = None,
    seed: int = 0,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize ``model`` in place and attach LoRA adapters; freeze everything else.

    Either one ``quantizer`` + ``config`` for every layer ``targets`` selects, or a ``plan``
    (module name -> quantizer and config, e.g. from an allocator). A quantizer whose
    ``spec.needs`` names statistics (``"hessian"``, ``"fisher"``) must get them in ``stats``;
    a layer lacking them is an error before any layer is touched.

    All or nothing: every layer is quantized into a new module first, and the modules are
    swapped in (and the model frozen) only once all of them succeeded, so an error at any
    layer leaves ``model`` exactly as it was. The price is memory: until the swap the
    quantized layers (a fraction of the dense size) live beside the dense model.
    """
    lq = LayerQuantizer(
        model, quantizer, config, lora=lora, targets=targets, plan=plan, registry=registry, seed=seed
    )
    lq.check_stats(stats)
    built: list[tuple[str, LoRALinear, LayerReport]] = []
    for name in tqdm(list(lq.entries), desc="quantizing", unit="layer", disable=not progress):
        new, layer_report = lq.build(name, stats.get(name) if stats else None)
        built.append((name, new, layer_report))
    try:
        lq.freeze()
        for name, new, _ in built:
            lq.swap(name, new)
    except BaseException:
        lq.rollback()
        raise
    return QuantizeReport([r for _, _, r in built])


def convert_adapters(
    model: nn.Module,
    adapter: str,
    adapter_config: Mapping[str, Any] | None = None,
    *,
    registry: Registry | None = None,
) -> list[str]:
    """Give every LoRA-adapted layer of ``model`` the ``adapter`` variant instead, built from
    its current ``A`` and ``B`` over the same frozen base (the quantized tensors are shared).

    For finetuning a checkpoint written with plain LoRA adapters as DoRA or IEC: at their
    default settings both start from exactly the function the LoRA layer computes. Only
    plain-LoRA layers convert (another variant's own parameters would be dropped); all or
    nothing, checked before any layer is touched. Returns the converted layers' names.
    """
    registry = registry or get_registry()
    spec = registry.adapter(adapter)
    layers = list(iter_lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRALinear layers to convert: quantize it first")
    other = sorted({m.adapter_name for _, m in layers} - {"lora", adapter})
    if other:
        raise ValueError(
            f"only plain LoRA adapters convert to another variant; this model has {other} adapters, whose "
            "own parameters would be lost"
        )
    todo = [(n, m) for n, m in layers if m.adapter_name != adapter]
    configs = {n: m.lora_config.model_copy(update={"adapter": adapter, "adapter_config": dict(adapter_config or {})})
               for n, m in todo}
    cfg = validate_config(spec.config_model, dict(adapter_config or {}), what=f"{adapter} adapter config")
    if spec.check is not None:
        for name, m in todo:
            try:
                spec.check((m.out_features, m.in_features), configs[name], cfg)
            except ValueError as exc:
                raise ValueError(f"layer {name!r}: {exc}") from None
    built = []
    for name, m in todo:
        new = LoRALinear.from_base(
            m.base_layer, configs[name], lora_a=m.lora_A.detach(), lora_b=m.lora_B.detach(), adapter=spec
        )
        new.adapters_enabled = m.adapters_enabled
        new.train(m.training)
        built.append((name, new))
    for name, new in built:
        replace_module(model, name, new)
    return [n for n, _ in built]


def iter_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (and biases where ``train_bias`` was asked)."""
    return [p for _, m in iter_lora_layers(model) for p in m.parameters() if p.requires_grad]


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    for _, m in iter_lora_layers(model):
        m.adapters_enabled = enabled


def size_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer: what the model occupies."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
