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

from lqmod.config import AdapterConfig, FrozenModel, InitializerConfig, LoRAConfig, QuantizerConfig

if TYPE_CHECKING:
    from lqmod.kernels.formats import LutFormat
    from lqmod.nn.adapter import Adapter
    from lqmod.nn.quantized_linear import QuantizedLinear

__all__ = [
    "AdapterSpec",
    "AllocationProblem",
    "AllocationResult",
    "AllocatorSpec",
    "Candidate",
    "InfeasibleBudget",
    "InitResult",
    "InitializerSpec",
    "LayerStats",
    "Option",
    "PeftForm",
    "QuantizedWeight",
    "QuantizerSpec",
    "TensorLayout",
    "check_tensor_layout",
]

JSONValue = Any  # a value json.dumps accepts
_JSON_KIND: dict[Any, str] = {str: "string", dict: "object", (list, tuple): "array"}


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
        """Rebuild from :meth:`header` data and the tensors; malformed data is a ``ValueError``
        saying which field is wrong and what it must be (headers come from files users edit)."""
        if not isinstance(header, Mapping):
            raise ValueError(f"quantized weight header must be a JSON object, got {type(header).__name__}")
        kinds: tuple[tuple[str, type | tuple[type, ...]], ...] = (
            ("quantizer", str), ("config", dict), ("shape", (list, tuple)), ("tensors", (list, tuple))
        )
        for key, kind in kinds:
            if key not in header:
                raise ValueError(f"quantized weight header lacks {key!r}")
            if not isinstance(header[key], kind):
                raise ValueError(
                    f"quantized weight header field {key!r} must be a JSON {_JSON_KIND[kind]}, got {header[key]!r}"
                )
        names = header["tensors"]
        if not all(isinstance(k, str) for k in names):
            raise ValueError(f"quantized weight header field 'tensors' must list tensor names, got {names!r}")
        missing = set(names) - set(tensors)
        if missing:
            raise ValueError(
                f"quantized weight ({header['quantizer']}) lacks tensors {sorted(missing)}"
            )
        # A default, so an unknown name ("float99") is the ValueError below, not an AttributeError.
        dtype = getattr(torch, str(header.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {header.get('dtype')!r} in quantized weight header")
        shape_data = header["shape"]
        # bool is an int in Python; a shape of [true, 4] is as wrong as ["a", 4].
        if len(shape_data) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                           for s in shape_data):
            raise ValueError(
                f"quantized weight shape must be 2-D, two positive integers [out, in], got {shape_data!r}"
            )
        meta = header.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"quantized weight header field 'meta' must be a JSON object, got {meta!r}")
        return cls(
            quantizer=header["quantizer"],
            config=dict(header["config"]),
            shape=(int(shape_data[0]), int(shape_data[1])),
            tensors={k: tensors[k] for k in names},
            meta=dict(meta),
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
Validate = Callable[[QuantizedWeight, Any], None]

#: What a quantizer stores for one config and shape: tensor name -> (shape, dtype).
TensorLayout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def check_tensor_layout(qweight: QuantizedWeight, expected: TensorLayout) -> None:
    """Raise ``ValueError`` naming every difference between ``qweight``'s tensors and ``expected``.

    The building block of a :attr:`QuantizerSpec.validate` hook: the quantizer states which
    tensors (names, shapes, dtypes) its config implies for ``qweight.shape``, and a loaded
    weight whose tensors disagree (a checkpoint edited to ``bits=2``, a wrong block size,
    a dropped tensor) is refused instead of being materialized into garbage.
    """
    problems: list[str] = []
    have = qweight.tensors
    missing = sorted(set(expected) - set(have))
    extra = sorted(set(have) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"unexpected tensors {extra}")
    for name in sorted(set(expected) & set(have)):
        want_shape, want_dtype = expected[name]
        t = have[name]
        if tuple(t.shape) != tuple(want_shape) or t.dtype != want_dtype:
            problems.append(
                f"tensor {name!r} is {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}, "
                f"the config implies {tuple(want_shape)} {str(want_dtype).removeprefix('torch.')}"
            )
    if problems:
        raise ValueError(
            f"{qweight.quantizer} weight of shape {tuple(qweight.shape)} does not match its config "
            f"{qweight.config}: " + "; ".join(problems)
        )


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
    ``validate(qweight, config)``, optional but expected of every quantizer, checks a weight
    read back from a checkpoint against ``config`` (the ``config_model`` instance rebuilt from
    ``qweight.config``): the stored tensors' names, shapes and dtypes (see
    :func:`check_tensor_layout`) and any value ranges ``materialize`` relies on. It returns
    None or raises ``ValueError`` saying what does not match; the core calls it on every
    loaded layer and refuses the checkpoint naming the layer. The core also checks that the
    stored bits equal ``bits_per_param(config, shape)``, so even a quantizer without
    ``validate`` refuses a config edited to another bit width.
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
    validate: Validate | None = None


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
    """A LoRA initializer registration. ``initialize`` is called once per adapted layer.

    ``needs`` names the calibration statistics ``initialize`` requires (``"hessian"``,
    ``"fisher"``), exactly like :attr:`QuantizerSpec.needs`: ``quantize_model`` refuses a
    layer lacking them before touching the model, and the calibration drivers gather them.
    """

    name: str
    config_model: type[InitializerConfig]
    initialize: InitFn
    description: str = ""
    needs: frozenset[str] = frozenset()


class BuildAdapter(Protocol):
    def __call__(
        self,
        *,
        base: QuantizedLinear,
        lora: LoRAConfig,
        config: Any,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
    ) -> Adapter: ...


@dataclass(frozen=True)
class PeftForm:
    """How PEFT's own LoRA layer loads an adapter variant.

    ``config`` holds the ``LoraConfig`` fields the variant sets (``{"use_dora": True}``);
    ``tensors(adapter)`` returns the variant's tensors under PEFT's per-module names
    (``"lora_A.weight"``, ``"lora_B.weight"``, ``"lora_magnitude_vector"``), in PEFT's
    layout, which loads them onto a dense copy of the quantized base.
    """

    config: Mapping[str, JSONValue]
    tensors: Callable[[Adapter], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter variant registration (LoRA, DoRA, IEC, a third party's).

    ``build(base=, lora=, config=, lora_a=, lora_b=)`` returns the trainable
    :class:`~lqmod.nn.adapter.Adapter` module beside the frozen ``base``
    (a :class:`~lqmod.nn.quantized_linear.QuantizedLinear`), starting from the initializer's
    ``A`` (r, in) and ``B`` (out, r); ``config`` is a validated ``config_model`` instance.
    It raises ``ValueError`` (one line: what does not fit, what would) for a layer the
    variant cannot adapt; ``check(shape, lora, config)``, optional, raises the same error from
    the (out, in) shape alone, so a model is refused before any layer is quantized.
    The adapter's forward must not keep a dense weight for backward.
    ``peft`` says how PEFT loads the variant, or is None when PEFT cannot (export refuses it).
    ``validate(adapter)``, optional, checks an adapter whose state was read back from a
    checkpoint (values ``forward`` relies on) and raises ``ValueError`` saying what is wrong.
    """

    name: str
    config_model: type[AdapterConfig]
    build: BuildAdapter
    peft: PeftForm | None = None
    description: str = ""
    check: Callable[[tuple[int, int], LoRAConfig, Any], None] | None = None
    validate: Callable[[Adapter], None] | None = None


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
