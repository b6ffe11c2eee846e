"""Self-contained checkpoints (safetensors + JSON, no pickle) and PEFT adapter export.

A checkpoint directory holds:

* ``model.safetensors``: every tensor of the model: quantized tensors, adapters, and the
  parameters that were not quantized (embeddings, norms, heads);
* ``lqmod.json``: the format version, the lqmod version that wrote it, the model's class
  and config, the LoRA config, each quantized layer's header (quantizer, config, shape,
  meta), the SHA-256 and size of the tensor file, and an ``integrity`` record: the SHA-256
  of every layer header and of the whole manifest. A truncated or corrupted tensor file, or
  a manifest edited by hand, is refused with a message naming what changed (and the layer).

On load every layer is also checked by its quantizer (:func:`lqmod.quantize.validate_qweight`:
config, the spec's ``validate`` hook, exact storage bits) and must materialize finite values.

Directories are written to a temporary sibling (``.NAME.tmp-PID-TOKEN``) and renamed into
place, so an interrupted save never leaves a half-written checkpoint under the target name.
An overwrite first writes a journal (``.NAME.swap-PID-TOKEN.json``); the next save or load
of ``NAME`` finishes a swap whose process died between its two renames and sweeps the
temporaries of dead processes. Files get ordinary permissions (``0666``/``0777`` minus the
umask) and identical models give byte-identical files.

Modules: :mod:`~lqmod.io.format` (file names, versions, the error, canonical hashing),
:mod:`~lqmod.io.atomic` (atomic directories, recovery), :mod:`~lqmod.io.tensor_files`
(safetensors writing, the spool), :mod:`~lqmod.io.manifest` (building and writing the
manifest), :mod:`~lqmod.io.validation` (reading and checking it), :mod:`~lqmod.io.save`,
:mod:`~lqmod.io.load`, :mod:`~lqmod.io.peft_export`.
"""

from __future__ import annotations

from lqmod.io.atomic import LEGACY_STALE_SECONDS as LEGACY_STALE_SECONDS
from lqmod.io.atomic import atomic_dir, recover_interrupted_save
from lqmod.io.format import FORMAT as FORMAT
from lqmod.io.format import FORMAT_VERSION as FORMAT_VERSION
from lqmod.io.format import MANIFEST as MANIFEST
from lqmod.io.format import TENSOR_METADATA as TENSOR_METADATA
from lqmod.io.format import TENSORS as TENSORS
from lqmod.io.format import CheckpointError
from lqmod.io.format import _digest as _digest
from lqmod.io.load import load_checkpoint
from lqmod.io.manifest import checkpoint_manifest, finish_checkpoint
from lqmod.io.manifest import layer_header as layer_header
from lqmod.io.peft_export import dequantized_copy, export_peft
from lqmod.io.save import save_checkpoint
from lqmod.io.tensor_files import TensorSpool, write_safetensors
from lqmod.io.validation import read_manifest

__all__ = [
    "CheckpointError",
    "TensorSpool",
    "atomic_dir",
    "checkpoint_manifest",
    "dequantized_copy",
    "export_peft",
    "finish_checkpoint",
    "load_checkpoint",
    "read_manifest",
    "recover_interrupted_save",
    "save_checkpoint",
    "write_safetensors",
]
