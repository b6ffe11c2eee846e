"""Reading a checkpoint's manifest: its structure, integrity hashes and the tensor file's hash."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lqmod.io.atomic import recover_interrupted_save
from lqmod.io.format import FORMAT, FORMAT_VERSION, MANIFEST, TENSORS, CheckpointError, _digest
from lqmod.io.tensor_files import _sha256


def _expect(cond: bool, mpath: Path, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{mpath}: {what}; the manifest is damaged or was edited")


def _check_structure(manifest: Any, mpath: Path) -> dict[str, Any]:
    """Types of every manifest field lqmod reads, so a damaged one is a sentence, not a traceback."""
    _expect(isinstance(manifest, dict), mpath, f"must hold a JSON object, not a JSON {type(manifest).__name__}")
    assert isinstance(manifest, dict)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT!r}")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{mpath}: 'version' must be an integer, got {version!r}; the manifest is damaged")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{mpath}: format version {version} is newer than this lqmod reads "
            f"({FORMAT_VERSION}); upgrade lqmod"
        )
    for key in ("model", "lora", "layers", "files"):
        _expect(isinstance(manifest.get(key), dict), mpath, f"{key!r} must be a JSON object, got {manifest.get(key)!r}")
    for key in ("aliases", "extra"):
        _expect(isinstance(manifest.get(key, {}), dict), mpath, f"{key!r} must be a JSON object")
    aliases = manifest.get("aliases", {})
    _expect(all(isinstance(v, str) for v in aliases.values()), mpath, "'aliases' must map names to names")
    for name, header in manifest["layers"].items():
        _expect(isinstance(header, dict), mpath, f"layer {name!r} must be a JSON object, got {header!r}")
    want = manifest["files"].get(TENSORS)
    _expect(
        isinstance(want, dict) and isinstance(want.get("sha256"), str)
        and isinstance(want.get("bytes"), int) and not isinstance(want.get("bytes"), bool),
        mpath, f"'files' must give the sha256 (a string) and bytes (an integer) of {TENSORS}",
    )
    return manifest


def _check_integrity(manifest: dict[str, Any], mpath: Path) -> None:
    if manifest["version"] < 2:
        return  # written before integrity records existed
    record = manifest.get("integrity")
    _expect(isinstance(record, dict) and record.get("algorithm") == "sha256"
            and isinstance(record.get("layers"), dict) and isinstance(record.get("manifest"), str),
            mpath, "its 'integrity' record (sha256 of the manifest and of every layer) is missing or malformed")
    assert isinstance(record, dict)
    stored_layers: dict[str, Any] = record["layers"]
    for name in sorted(set(manifest["layers"]) | set(stored_layers)):
        if name not in manifest["layers"] or name not in stored_layers:
            raise CheckpointError(
                f"{mpath}: layer {name!r} is listed in only one of 'layers' and 'integrity'; "
                "the manifest is damaged or was edited"
            )
        if _digest(manifest["layers"][name]) != stored_layers[name]:
            raise CheckpointError(
                f"{mpath}: the header of layer {name!r} (quantizer, config, shape ...) does not match its "
                "SHA-256: the manifest was edited or damaged after it was saved; restore the original file"
            )
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    if _digest(body) != record["manifest"]:
        raise CheckpointError(
            f"{mpath} does not match its SHA-256: the manifest was edited or damaged after it was saved; "
            "restore the original file"
        )


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's JSON manifest, after checking it and that the tensor file is whole."""
    path = Path(path)
    recover_interrupted_save(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} not found (expected a directory with {MANIFEST} and {TENSORS})")
    mpath = path / MANIFEST
    if not mpath.exists():
        raise CheckpointError(f"{path} has no {MANIFEST}: not an lqmod checkpoint")
    try:
        raw = json.loads(mpath.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{mpath} is not valid JSON ({exc}); the checkpoint is corrupted") from None
    except RecursionError:
        raise CheckpointError(f"{mpath} is nested too deeply to be a manifest; the checkpoint is corrupted") from None
    manifest = _check_structure(raw, mpath)
    try:
        _check_integrity(manifest, mpath)
    except ValueError as exc:  # e.g. NaN or a non-string key: not canonical JSON, so not what was saved
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{mpath} holds values no lqmod manifest holds ({exc}); it was edited") from None
    tpath = path / TENSORS
    want = manifest["files"][TENSORS]
    if not tpath.exists():
        raise CheckpointError(f"{tpath} is missing")
    size = tpath.stat().st_size
    if size != want["bytes"]:
        raise CheckpointError(
            f"{tpath} is truncated or was modified: {size} bytes, the manifest says {want['bytes']}"
        )
    if _sha256(tpath) != want["sha256"]:
        raise CheckpointError(f"{tpath} is corrupted: its SHA-256 does not match the manifest")
    return manifest
