"""lqmod inside transformers and PEFT.

* :mod:`lqmod.integrations.peft`: PEFT LoRA/DoRA over :class:`~lqmod.nn.QuantizedLinear`
  (importing it registers the layer with PEFT's custom-module dispatch);
* :mod:`lqmod.integrations.transformers`: the ``"lqmod"`` quantization method for
  ``from_pretrained(..., quantization_config=LqmodConfig(...))`` and ``save_pretrained``;
* :mod:`lqmod.integrations.merge`: adapters merged into a dense model or re-quantized;
* :mod:`lqmod.integrations.base`: quantize a loaded model's linear layers to QuantizedLinear;
* :mod:`lqmod.integrations.serving`: the serving route, a quantized base in an engine's
  format (GPTQ, for OPTQ layers) plus the adapter in PEFT's format
  (:func:`export_gptq_peft`, :func:`export_for_serving`; ``lqmod export``).

Nothing is imported here, so ``import lqmod`` never pulls in transformers or PEFT;
:func:`register` imports (and so registers) whichever of the two is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__all__ = ["export_for_serving", "export_gptq_peft", "register"]


def register() -> list[str]:
    """Register lqmod with transformers and PEFT, where installed; returns which were registered."""
    done: list[str] = []
    if importlib.util.find_spec("transformers") is not None:
        importlib.import_module("lqmod.integrations.transformers")
        done.append("transformers")
    if importlib.util.find_spec("peft") is not None:
        importlib.import_module("lqmod.integrations.peft")
        done.append("peft")
    return done


def __getattr__(name: str) -> Any:
    # Imported on first use, so that ``import lqmod.integrations`` stays light.
    if name in ("export_for_serving", "export_gptq_peft"):
        return getattr(importlib.import_module("lqmod.integrations.serving"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
