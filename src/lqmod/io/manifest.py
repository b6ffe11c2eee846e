"""Building and writing a checkpoint's manifest (``lqmod.json``) with its integrity record."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lqmod.io.format import FORMAT, FORMAT_VERSION, MANIFEST, TENSORS, _digest
from lqmod.io.tensor_files import _sha256
from lqmod.nn.lora_linear import LoRALinear


def _model_info(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    info: dict[str, Any] = {"class": type(model).__name__, "module": type(model).__module__}
    if config is not None and hasattr(config, "to_dict"):
        info["library"] = "transformers"
        info["config"] = config.to_dict()
    return info


def _lqmod_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("lqmod")
    except PackageNotFoundError:  # running from a source tree that was never installed
        import lqmod

        return str(lqmod.__version__)


def layer_header(m: LoRALinear) -> dict[str, Any]:
    """What the manifest records of one quantized layer."""
    return {
        **m.base.header,
        "bias": m.bias is not None,
        "origin": m.origin,
        "adapter": m.adapter_name,
        "adapter_config": m.adapter_config.model_dump(mode="json"),
    }


def checkpoint_manifest(
    model: nn.Module,
    lora_json: str,
    layers: Mapping[str, dict[str, Any]],
    aliases: Mapping[str, str],
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """The manifest of a checkpoint of ``model`` before its file hashes (see :func:`finish_checkpoint`).

    ``model`` only gives its class and config: a skeleton on the meta device will do.
    """
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "lqmod_version": _lqmod_version(),
        "model": _model_info(model),
        "lora": json.loads(lora_json),
        "layers": dict(layers),
        "aliases": dict(aliases),
        "extra": extra or {},
    }


def finish_checkpoint(tmp: Path, manifest: dict[str, Any], *, tensors_sha256: str | None = None) -> None:
    """Hash ``tmp/model.safetensors`` into ``manifest``, add the integrity record, write ``lqmod.json``.

    ``tmp`` is the directory :func:`atomic_dir` yields; ``tensors_sha256`` spares re-reading
    a tensor file whose hash the writer computed as it went.
    """
    tfile = tmp / TENSORS
    manifest["files"] = {TENSORS: {"sha256": tensors_sha256 or _sha256(tfile), "bytes": tfile.stat().st_size}}
    # Hash the manifest as a reader will see it (tuples become lists, keys strings ...).
    body = json.loads(json.dumps(manifest))
    manifest["integrity"] = {
        "algorithm": "sha256",
        "layers": {name: _digest(header) for name, header in body["layers"].items()},
        "manifest": _digest(body),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
