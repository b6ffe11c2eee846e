"""The data that crosses the plug-in boundary.

Registrations are frozen dataclasses (conda-style typed registrations): a plug-in's hook
returns them, the manager indexes them by name, and the hot path keeps direct references
to their callables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from lqmod.config import FrozenModel, InitializerConfig, LoRAConfig, QuantizerConfig

if TYPE_CHECKING:
    from lqmod.kernels.formats import LutFormat

__all__ = [
    "AllocationProblem",
    "AllocationResult",
    "AllocatorSpec",
    "Candidate",
    "InfeasibleBudget",
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


class Candidate(NamedTuple):
    """One row of an allocation problem: an option for a matrix, its error and its exact storage bits."""

    option: Option
    error: float
    bits: int


class InfeasibleBudget(ValueError):
    """The budget is below the smallest feasible one (the cheapest option for every matrix).

    ``min_bits`` is that smallest feasible budget; the message states it in bits per parameter
    (when ``n_params`` is known) and in bytes, so the user can pick a budget that works.
    """

    def __init__(self, budget_bits: int, min_bits: int, n_params: int | None = None) -> None:
        self.budget_bits = budget_bits
        self.min_bits = min_bits
        self.n_params = n_params

        def describe(bits: int) -> str:
            avg = f"{bits / n_params:.4f} bits/param = " if n_params else ""
            return f"{avg}{bits / 8:.0f} bytes ({bits} bits)"

        super().__init__(
            f"budget {describe(budget_bits)} is infeasible: the smallest feasible budget, the cheapest "
            f"option for every matrix, is {describe(min_bits)}"
        )


@dataclass(frozen=True)
class AllocationProblem:
    """What an allocator solves: choose one candidate per matrix, total bits <= ``budget_bits``.

    ``candidates`` maps each matrix name to its options (every one valid for that matrix);
    ``numel`` maps it to its parameter count. The objective is the sum of the chosen errors.
    """

    candidates: Mapping[str, Sequence[Candidate]]
    budget_bits: int
    numel: Mapping[str, int]

    @property
    def n_params(self) -> int:
        return sum(self.numel[name] for name in self.candidates)

    def min_bits(self) -> int:
        """The smallest feasible budget: the cheapest candidate of every matrix."""
        return sum(min(c.bits for c in rows) for rows in self.candidates.values())

    def check_feasible(self) -> None:
        """Raise :class:`InfeasibleBudget` when even the cheapest choice exceeds the budget."""
        empty = [name for name, rows in self.candidates.items() if not rows]
        if empty:
            raise ValueError(f"no valid option for matrices {empty[:5]}: nothing can be allocated")
        low = self.min_bits()
        if low > self.budget_bits:
            raise InfeasibleBudget(self.budget_bits, low, self.n_params)

    def cost(self, choice: Mapping[str, int]) -> tuple[float, int]:
        """(total error, total bits) of a choice (matrix -> candidate index)."""
        err = math.fsum(self.candidates[n][i].error for n, i in choice.items())
        bits = sum(self.candidates[n][i].bits for n, i in choice.items())
        return err, bits


@dataclass(frozen=True)
class AllocationResult:
    """An allocator's answer: the chosen candidate index per matrix, and how it was found.

    ``status`` is "optimal", "time_limit", "heuristic" ... ; ``gap`` the proven relative
    optimality gap when the allocator knows one; ``info`` any JSON-able solver details.
    """

    choice: dict[str, int]
    status: str = "heuristic"
    gap: float | None = None
    info: dict[str, JSONValue] = field(default_factory=dict)


@dataclass(frozen=True)
class AllocatorSpec:
    """An allocator registration: ``allocate(problem, config) -> AllocationResult``.

    ``problem`` is an :class:`AllocationProblem`; ``config`` a validated ``config_model``
    instance. An allocator raises :class:`InfeasibleBudget` (``problem.check_feasible()``)
    when no choice fits, and must return a choice for every matrix within the budget (the
    planner checks both and calls a violation a plug-in bug).
    """

    name: str
    config_model: type[FrozenModel]
    allocate: Callable[[AllocationProblem, Any], AllocationResult]
    description: str = ""


def packed_nbytes(n_codes: int, bits: int) -> int:
    """Bytes needed to store ``n_codes`` codes of ``bits`` bits packed back to back."""
    return math.ceil(n_codes * bits / 8)
