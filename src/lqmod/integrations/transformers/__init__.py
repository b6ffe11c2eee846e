"""The ``"lqmod"`` quantization method for transformers: any lqmod quantizer through ``from_pretrained``.

Importing this module registers :class:`LqmodConfig` and :class:`LqmodHfQuantizer` with
transformers (``register_quantization_config`` / ``register_quantizer``)::

    import lqmod.integrations.transformers  # noqa: F401
    from lqmod.integrations.transformers import LqmodConfig

    model = AutoModelForCausalLM.from_pretrained(
        local_dir, quantization_config=LqmodConfig(quantizer="nf", config={"bits": 4, "blocksize": 64})
    )
    model.save_pretrained(out)              # safetensors + quantization_config in config.json
    model = AutoModelForCausalLM.from_pretrained(out)   # the quantized model again, no original weights

Loading quantizes each selected linear weight as it arrives (one dense layer in memory at a
time) with any registered quantizer, or with a ``plan`` (module -> quantizer + config, e.g.
from ``lqmod plan``). Quantizers that need calibration statistics (OPTQ, QuIP#) cannot
quantize weight by weight: :func:`quantize_model` applies an ``LqmodConfig`` to a loaded model
with statistics the caller computed (``lqmod.calibration``), and the result saves and reloads
the same way.

A saved directory records, per quantized layer, the quantizer, its config and the stored
tensors' shapes and dtypes in ``config.json`` (``quantization_config.layers``), so reloading
builds the quantized layers before any tensor is read. Without lqmod imported, transformers
does not know the method ``"lqmod"``: it logs "Unknown quantization type, got lqmod ... we
will skip the quantization" and would load the model as if it were dense. To make that fail
instead of silently producing a randomly initialised model, each quantized layer's
``<name>.weight`` is saved as a one-element placeholder: plain transformers then stops with a
size-mismatch ``RuntimeError`` naming that weight. The remedy is to
``import lqmod.integrations.transformers`` before ``from_pretrained``.

Modules: :mod:`~lqmod.integrations.transformers.config` (``LqmodConfig``),
:mod:`~lqmod.integrations.transformers.hf_quantizer` (``LqmodHfQuantizer``),
:mod:`~lqmod.integrations.transformers.records` (per-layer records),
:mod:`~lqmod.integrations.transformers.calibrated` (statistics, then quantization),
:mod:`~lqmod.integrations.transformers.loaded_models` (``quantize_model``, ``attach_quantizer``).
"""

from __future__ import annotations

from lqmod.integrations.transformers.config import CALIBRATION_DEFAULTS as CALIBRATION_DEFAULTS
from lqmod.integrations.transformers.config import LqmodConfig
from lqmod.integrations.transformers.hf_quantizer import LqmodHfQuantizer
from lqmod.integrations.transformers.loaded_models import attach_quantizer, quantize_model
from lqmod.integrations.transformers.records import FORMAT_VERSION as FORMAT_VERSION
from lqmod.integrations.transformers.records import METHOD, PLACEHOLDER_SUFFIX, layer_records

__all__ = [
    "METHOD",
    "PLACEHOLDER_SUFFIX",
    "LqmodConfig",
    "LqmodHfQuantizer",
    "attach_quantizer",
    "layer_records",
    "quantize_model",
]
