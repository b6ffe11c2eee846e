"""A quantizer registration (``QuantizerSpec``), its callables, options and tensor layouts."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lqmod.config import QuantizerConfig
from lqmod.types.weights import LayerStats, QuantizedWeight

if TYPE_CHECKING:
    from lqmod.kernels.formats import LutFormat


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
