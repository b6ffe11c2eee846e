"""What a checkpoint directory is: its file names, format versions, error, and hashing.

The manifest hashes JSON values in one canonical spelling (:func:`_digest`), so a reader can
tell a manifest edited by hand from the one that was saved.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FORMAT = "lqmod-checkpoint"
# 2: integrity hashes of the manifest and every layer header, lqmod_version. Version 1
# checkpoints (no integrity record) still load, with every other check.
# 3: every layer records its adapter variant ("adapter", "adapter_config"); a layer's tensors
# are "base_layer.base.*", "base_layer.bias" and "adapter.*". Older checkpoints (flat
# "lora_A", "lora_B", "base.*", "bias") load as the "lora" variant.
FORMAT_VERSION = 3
MANIFEST = "lqmod.json"
TENSORS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupted or of an unknown format."""


TENSOR_METADATA = {"format": "pt", "lqmod": FORMAT}


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _digest(value: Any) -> str:
    """SHA-256 of a JSON value in one canonical spelling (what the manifest hashes)."""
    return hashlib.sha256(_canonical_json(value)).hexdigest()
