"""An adapter variant registration (``AdapterSpec``) and how PEFT loads a variant."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lqmod.config import AdapterConfig, LoRAConfig
from lqmod.types.weights import JSONValue

if TYPE_CHECKING:
    from lqmod.nn.adapter import Adapter
    from lqmod.nn.quantized_linear import QuantizedLinear


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
