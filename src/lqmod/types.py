"""The data that crosses the plug-in boundary.

Registrations are frozen dataclasses (conda-style typed registrations): a plug-in's hook
returns them, the manager indexes them by name, and the hot path keeps direct references
to their callables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lqmod.config import InitializerConfig, LoRAConfig, QuantizerConfig

if TYPE_CHECKING:
    from lqmod.kernels.formats import LutFormat

__all__ = [
    "AllocatorSpec",
    "InitResult",
    "InitializerSpec",
    "LayerStats",
    "Option",
    "QuantizedWeight",
    "QuantizerSpec",
]

JSONValue = Any  # a value json.dumps accepts


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input, all optional.

    ``hessian`` is X^T X summed over calibration tokens (in_features x in_features, float64),
    ``n_tokens`` how many tokens it summed, ``fisher`` a diagonal Fisher estimate shaped like
    the weight, ``act_absmean`` the mean |x| per input feature.
    """

    hessian: torch.Tensor | None = None
    n_tokens: int = 0
    fisher: torch.Tensor | None = None
    act_absmean: torch.Tensor | None = None


@dataclass
class QuantizedWeight:
    """One quantized matrix: the tensors a quantizer stored, and the JSON metadata to read them.

    ``shape`` is the dense (out_features, in_features). ``tensors`` hold everything needed to
    materialize the weight (codes, scales, codebooks ...); their byte count *is* the storage
    cost, so a quantizer must store codes packed. ``meta`` holds small JSON values (not
    counted: they are per-matrix constants, not per-parameter data).
    """

    quantizer: str
    config: dict[str, JSONValue]
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor]
    meta: dict[str, JSONValue] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def storage_bits(self) -> int:
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors.values())

    def bits_per_param(self) -> float:
        return self.storage_bits() / self.numel

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            self.quantizer,
            dict(self.config),
            self.shape,
            {k: v.to(device) for k, v in self.tensors.items()},
            dict(self.meta),
            self.dtype,
        )

    def header(self) -> dict[str, JSONValue]:
        """Everything but the tensors, as JSON-able data (stored in checkpoints)."""
        return {
            "quantizer": self.quantizer,
            "config": self.config,
            "shape": list(self.shape),
            "meta": self.meta,
            "dtype": str(self.dtype).removeprefix("torch."),
            "tensors": sorted(self.tensors),
        }

    @classmethod
    def from_header(
        cls, header: Mapping[str, JSONValue], tensors: Mapping[str, torch.Tensor]
    ) -> QuantizedWeight:
        missing = set(header["tensors"]) - set(tensors)
        if missing:
            raise ValueError(
                f"quantized weight ({header['quantizer']}) lacks tensors {sorted(missing)}"
            )
        # A default, so an unknown name ("float99") is the ValueError below, not an AttributeError.
        dtype = getattr(torch, str(header["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {header['dtype']!r} in quantized weight header")
        shape = tuple(int(s) for s in header["shape"])
        if len(shape) != 2:
            raise ValueError(f"quantized weight shape must be 2-D, got {shape}")
        return cls(
            quantizer=str(header["quantizer"]),
            config=dict(header["config"]),
            shape=(shape[0], shape[1]),
            tensors={k: tensors[k] for k in header["tensors"]},
            meta=dict(header.get("meta", {})),
            dtype=dtype,
        )

    def to_safetensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and string metadata for :func:`safetensors.torch.save_file`."""
        return (
            {k: v.contiguous() for k, v in self.tensors.items()},
            {"lqmod.qweight": json.dumps(self.header(), sort_keys=True)},
        )

    @classmethod
    def from_safetensors(
        cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
    ) -> QuantizedWeight:
        if "lqmod.qweight" not in metadata:
            raise ValueError("safetensors file has no 'lqmod.qweight' metadata: not a QuantizedWeight")
        return cls.from_header(json.loads(metadata["lqmod.qweight"]), tensors)


Quantize = Callable[[torch.Tensor, Any, LayerStats | None], QuantizedWeight]
Materialize = Callable[[QuantizedWeight, torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class Option:
    """One choice an allocator may make for a matrix: a quantizer and a config of it."""

    quantizer: str
    config: QuantizerConfig

    @property
    def label(self) -> str:
        fields = self.config.model_dump(exclude={"version"})
        return self.quantizer + "(" + ",".join(f"{k}={v}" for k, v in fields.items()) + ")"


@dataclass(frozen=True)
class QuantizerSpec:
    """A quantizer registration.

    ``quantize(weight, config, stats)`` takes the dense (out, in) weight (any float dtype),
    a validated ``config_model`` instance and optional calibration statistics.
    ``materialize(qweight, dtype)`` returns the dense (out, in) weight in ``dtype``; it must
    be a pure function of the stored tensors (it runs again in backward).
    ``bits_per_param(config, shape)`` returns the exact storage cost a quantize call would
    produce, metadata included, without quantizing. ``options()`` lists the configs an
    allocator may choose from. ``needs`` names the statistics ``quantize`` requires
    ("hessian", "fisher").
    ``lut_format(qweight)``, optional, describes the weight as a
    :class:`~lqmod.kernels.formats.LutFormat` (codes -> table -> per-group scale/offset) so
    the Triton kernels can run it, or returns None for configurations they cannot.
    """

    name: str
    config_model: type[QuantizerConfig]
    quantize: Quantize
    materialize: Materialize
    bits_per_param: Callable[[Any, tuple[int, int]], float]
    options: Callable[[], Iterable[QuantizerConfig]] = lambda: ()
    needs: frozenset[str] = frozenset()
    description: str = ""
    lut_format: Callable[[QuantizedWeight], LutFormat | None] | None = None


@dataclass(frozen=True)
class InitResult:
    """What an initializer returns: A (r, in), B (out, r), and optionally a replacement base.

    Initializers that fold part of the weight into the adapters (LQ-LoRA, LoftQ) return the
    new quantized base in ``qweight``; the others leave it ``None``.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    qweight: QuantizedWeight | None = None


class InitFn(Protocol):
    def __call__(
        self,
        *,
        weight: torch.Tensor | None,
        qweight: QuantizedWeight,
        materialize: Materialize,
        lora: LoRAConfig,
        config: Any,
        stats: LayerStats | None,
        generator: torch.Generator | None,
    ) -> InitResult: ...


@dataclass(frozen=True)
class InitializerSpec:
    """A LoRA initializer registration. ``initialize`` is called once per adapted layer."""

    name: str
    config_model: type[InitializerConfig]
    initialize: InitFn
    description: str = ""


@dataclass(frozen=True)
class AllocatorSpec:
    """An allocator registration: ``allocate(table, budget_bits, config) -> chosen option per matrix``.

    ``table`` maps matrix name to a list of ``(option, error, bits)``; the return value maps
    each matrix name to the index of its chosen option.
    """

    name: str
    config_model: type[QuantizerConfig]
    allocate: Callable[[Mapping[str, list[tuple[Option, float, int]]], float, Any], dict[str, int]]
    description: str = ""


def packed_nbytes(n_codes: int, bits: int) -> int:
    """Bytes needed to store ``n_codes`` codes of ``bits`` bits packed back to back."""
    return math.ceil(n_codes * bits / 8)
