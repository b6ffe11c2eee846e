"""Quantize a model straight from its safetensors files, one layer (or block) at a time.

The model is built as a skeleton on the meta device (no memory); each dense weight is read
from its file when its layer's turn comes, quantized, written to the checkpoint's spool and
dropped, so peak memory is about one dense layer plus one quantized layer plus the
calibration state, not the dense model. Calibrated quantizers run in GPTQ's sequential
mode (:mod:`lqmod.calibration.sequential`) with each transformer block loaded on entry and
written and freed on exit; only that block, the embedding and the block inputs of the
calibration batches are in memory at once.

The checkpoint is written incrementally into a temporary directory (:class:`lqmod.io.TensorSpool`)
and renamed into place only when complete (:func:`lqmod.io.atomic_dir`); it is the same
format-v2 checkpoint, byte for byte, that :func:`lqmod.model.quantize_model` then
:func:`lqmod.io.save_checkpoint` write for the same model loaded in float32.

Modules: :mod:`.source` (reading safetensors tensors into the meta skeleton), :mod:`.writer`
(the checkpoint as it is written), :mod:`.streamed` (the two passes: layer by layer, and block
by block for calibrated quantizers) and :mod:`.command` (``lqmod quantize --stream``).
"""

from __future__ import annotations

from lqmod.streaming.command import stream_command as stream_command
from lqmod.streaming.source import SafetensorsSource, build_skeleton
from lqmod.streaming.streamed import quantize_pretrained_streamed

__all__ = ["SafetensorsSource", "build_skeleton", "quantize_pretrained_streamed"]
