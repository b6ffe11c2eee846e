"""lqmod inside transformers and PEFT.

* :mod:`lqmod.integrations.peft`: PEFT LoRA/DoRA over :class:`~lqmod.nn.QuantizedLinear`
  (importing it registers the layer with PEFT's custom-module dispatch);
* :mod:`lqmod.integrations.transformers`: the ``"lqmod"`` quantization method for
  ``from_pretrained(..., quantization_config=LqmodConfig(...))`` and ``save_pretrained``;
* :mod:`lqmod.integrations.merge`: adapters merged into a dense model or re-quantized;
* :mod:`lqmod.integrations.base`: quantize a loaded model's linear layers to QuantizedLinear.

Nothing is imported here, so ``import lqmod`` never pulls in transformers or PEFT;
:func:`register` imports (and so registers) whichever of the two is installed.
"""

from __future__ import annotations

import importlib.util

__all__ = ["register"]


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
