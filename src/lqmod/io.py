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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lqmod.config import LoRAConfig
from lqmod.model import iter_lora_layers, replace_module
from lqmod.nn.lora_linear import LoRALinear
from lqmod.plugins import Registry, get_registry
from lqmod.quantize import QuantizationError, check_materialized, validate_qweight
from lqmod.types import QuantizedWeight

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


# Hidden siblings of a target NAME: .NAME.tmp-PID-TOKEN (being written), .NAME.old-PID-TOKEN
# (the replaced copy during an overwrite), .NAME.swap-PID-TOKEN.json (the overwrite's journal).
_SIBLING = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old|swap)-(?P<pid>\d+)-(?P<token>[0-9a-f]+)(?:\.json)?$")
# Leftovers of lqmod versions before the journal: .NAME.tmp-XXXXXXXX (mkdtemp, no pid) and .NAME.old-PID.
_LEGACY_TMP = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<token>[A-Za-z0-9_]{8})$")
_LEGACY_OLD = re.compile(r"^\.(?P<target>.+)\.old-(?P<pid>\d+)$")
# A legacy temporary carries no pid: it is taken for abandoned once it is this old.
LEGACY_STALE_SECONDS = 3600.0


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # unknown: never delete what might be in use
    return True


def _umask() -> int:
    # Linux reports it without changing it (setting it, even briefly, races with other threads).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the only portable way to read the umask is to set it; it is set straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_permissions(root: Path) -> None:
    """``0777``/``0666`` minus the umask, as ``mkdir``/``open`` would give (mkdtemp gives 0700)."""
    mask = _umask()
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. some platforms): the renames are still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _finish_swap(target: Path, journal: Path) -> None:
    """Complete the overwrite ``journal`` describes (its process died mid-swap)."""
    try:
        record = json.loads(journal.read_text())
        new = target.parent / str(record["new"])
        old = target.parent / str(record["old"])
    except (OSError, ValueError, KeyError, TypeError):
        journal.unlink(missing_ok=True)  # unreadable: written partly, before any rename
        return
    if new.is_dir():
        # The new copy is complete (the journal is written after it is): roll forward.
        if target.exists() and not old.exists():
            target.rename(old)
        if not target.exists():
            new.rename(target)
    elif not target.exists() and old.is_dir():
        old.rename(target)  # the new copy is gone: put the old one back rather than lose both
    _fsync_dir(target.parent)
    if target.exists():
        _remove(old)
        if new.exists():
            _remove(new)
    journal.unlink(missing_ok=True)


def recover_interrupted_save(target: str | os.PathLike[str]) -> list[str]:
    """Finish overwrites of ``target`` whose process died, and sweep its stale temporaries.

    Called by every save and load of ``target``. Only leftovers of processes that no longer
    run are touched (a concurrent save keeps its files). Returns what was done, one line per
    action; errors (e.g. a read-only parent) are warned about, never raised.
    """
    target = Path(target)
    parent = target.parent
    done: list[str] = []
    try:
        entries = list(parent.iterdir()) if parent.is_dir() else []
    except OSError:
        return done
    mine = []
    for entry in entries:
        m = _SIBLING.match(entry.name)
        if m and m["target"] == target.name:
            mine.append((entry, m["kind"], int(m["pid"])))
    try:
        referenced: set[str] = set()
        for entry, kind, pid in mine:
            if kind != "swap":
                continue
            if _pid_alive(pid):
                try:
                    record = json.loads(entry.read_text())
                    referenced.update(str(record.get(k)) for k in ("new", "old"))
                except (OSError, ValueError, AttributeError):
                    pass
                continue
            _finish_swap(target, entry)
            done.append(f"finished the interrupted overwrite of {target} recorded in {entry.name}")
        for entry, kind, pid in mine:
            if kind == "swap" or entry.name in referenced or _pid_alive(pid) or not entry.exists():
                continue
            _remove(entry)
            done.append(f"removed stale {entry.name}")
        for entry in entries:
            if not entry.exists():
                continue
            legacy_old = _LEGACY_OLD.match(entry.name)
            if legacy_old and legacy_old["target"] == target.name and not _pid_alive(int(legacy_old["pid"])):
                if not target.exists():
                    entry.rename(target)
                    done.append(f"restored {target} from {entry.name}, left by an interrupted overwrite")
                else:
                    _remove(entry)
                    done.append(f"removed stale {entry.name}")
                continue
            legacy_tmp = _LEGACY_TMP.match(entry.name)
            if (
                legacy_tmp
                and legacy_tmp["target"] == target.name
                and time.time() - entry.stat().st_mtime > LEGACY_STALE_SECONDS
            ):
                _remove(entry)
                done.append(f"removed stale {entry.name}")
    except OSError as exc:
        warnings.warn(f"could not clean up after an interrupted save of {target}: {exc}", RuntimeWarning, stacklevel=2)
    return done


@contextmanager
def atomic_dir(target: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` only if the block succeeds.

    The directory and its files get the permissions a plain ``mkdir``/``open`` would give
    (the umask is respected). An overwrite swaps old and new with two renames, recorded in a
    journal first, so a crash between them is finished by the next save or load.
    """
    target = Path(target)
    recover_interrupted_save(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    old = target.parent / f".{target.name}.old-{tag}"
    journal = target.parent / f".{target.name}.swap-{tag}.json"
    tmp.mkdir()
    try:
        yield tmp
        _normal_permissions(tmp)
        _fsync_tree(tmp)  # data on disk before a rename makes it visible
        if target.exists():
            journal.write_text(json.dumps({"new": tmp.name, "old": old.name}))
            with journal.open("rb") as fh:
                os.fsync(fh.fileno())
            _fsync_dir(target.parent)
            target.rename(old)
            tmp.rename(target)
            _fsync_dir(target.parent)
            _remove(old)
            journal.unlink()
        else:
            tmp.rename(target)
            _fsync_dir(target.parent)
    except BaseException:
        if not target.exists() and old.is_dir():
            old.rename(target)  # failed between the renames: the old copy goes back
        _remove(tmp)
        journal.unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without repeated storage (tied weights): tensors, and alias -> kept name."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def _model_info(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    info: dict[str, Any] = {"class": type(model).__name__, "module": type(model).__module__}
    if config is not None and hasattr(config, "to_dict"):
        info["library"] = "transformers"
        info["config"] = config.to_dict()
    return info


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _digest(value: Any) -> str:
    """SHA-256 of a JSON value in one canonical spelling (what the manifest hashes)."""
    return hashlib.sha256(_canonical_json(value)).hexdigest()


def _lqmod_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("lqmod")
    except PackageNotFoundError:  # running from a source tree that was never installed
        import lqmod

        return str(lqmod.__version__)


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                      metadata: Mapping[str, str] | None = None) -> None:
    """:func:`safetensors.torch.save_file` with a byte-for-byte deterministic header.

    safetensors keeps the string metadata in a hash map whose iteration order changes from
    one process to the next, so identical tensors gave files with different hashes; the
    header is rewritten here with the metadata keys sorted (same length, same offsets).
    """
    path = Path(path)
    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata else None)
    with path.open("r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        meta = header.pop("__metadata__", None)
        ordered: dict[str, Any] = {}
        if meta is not None:
            ordered["__metadata__"] = dict(sorted(meta.items()))
        ordered.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0])))
        raw = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(raw) <= n:
            fh.seek(8)
            fh.write(raw + b" " * (n - len(raw)))  # safetensors pads its header with spaces
            return
    # A header spelled longer than safetensors' own (it never is for ASCII names): rewrite the file.
    padded = raw + b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".canon")
    with path.open("rb") as src, tmp.open("wb") as dst:
        src.seek(8 + n)
        dst.write(len(padded).to_bytes(8, "little") + padded)
        shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(path)


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (quantized, with adapters) as a self-contained checkpoint directory."""
    layers = dict(iter_lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRALinear layers: quantize it first (lqmod.model.quantize_model)")
    lora_cfgs = {m.lora_config.model_dump_json() for m in layers.values()}
    if len(lora_cfgs) != 1:
        raise ValueError("all adapted layers must share one LoRA config to be saved together")
    tensors, aliases = _unique_state(model)
    manifest = checkpoint_manifest(
        model,
        next(iter(lora_cfgs)),
        {name: layer_header(m) for name, m in layers.items()},
        aliases,
        extra,
    )
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_safetensors(tensors, tmp / TENSORS, metadata=TENSOR_METADATA)
        finish_checkpoint(tmp, manifest)
    return Path(path)


TENSOR_METADATA = {"format": "pt", "lqmod": FORMAT}


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


class TensorSpool:
    """Tensors written to disk as they are made, assembled into one safetensors file at the end.

    A model too large for memory is saved this way: each tensor is appended to a spool file
    and dropped; :meth:`assemble` then copies the bytes into ``model.safetensors`` in the
    order and with the header :func:`write_safetensors` gives the same tensors held in
    memory, so both paths write byte-identical files. Memory: one tensor at a time, then a
    copy buffer; disk: the spool beside the result until it is assembled.
    """

    _CHUNK = 1 << 24

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fh = self.path.open("wb")
        self._index: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        self._offset = 0

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self._index)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._index:
            raise ValueError(f"tensor {name!r} was already written to the spool")
        t = tensor.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        self._fh.write(raw.numpy().tobytes() if raw.numel() < self._CHUNK else raw.numpy().data)
        self._index[name] = (t.dtype, tuple(t.shape), self._offset, int(raw.numel()))
        self._offset += int(raw.numel())

    def _layout(self) -> tuple[list[str], dict[str, str]]:
        """safetensors' own order of the tensors and its dtype names, asked of safetensors itself
        (one-element stand-ins, so it costs nothing) rather than re-implemented."""
        from safetensors.torch import save

        dummy = {name: torch.zeros(1, dtype=dtype) for name, (dtype, _, _, _) in self._index.items()}
        raw = save(dummy)
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        header.pop("__metadata__", None)
        order = sorted(header, key=lambda k: (header[k]["data_offsets"][0], k))
        return order, {k: str(v["dtype"]) for k, v in header.items()}

    def assemble(self, target: str | os.PathLike[str], metadata: Mapping[str, str] | None = None) -> str:
        """Write the safetensors file ``target``, delete the spool; return the file's SHA-256."""
        self._fh.close()
        order, dtypes = self._layout()
        ordered: dict[str, Any] = {}
        if metadata:
            ordered["__metadata__"] = dict(sorted(metadata.items()))
        start = 0
        for name in order:
            _, shape, _, nbytes = self._index[name]
            ordered[name] = {"dtype": dtypes[name], "shape": list(shape), "data_offsets": [start, start + nbytes]}
            start += nbytes
        raw = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes with spaces
        digest = hashlib.sha256()
        with Path(target).open("wb") as dst, self.path.open("rb") as src:
            for piece in (len(raw).to_bytes(8, "little"), raw):
                dst.write(piece)
                digest.update(piece)
            for name in order:
                _, _, offset, nbytes = self._index[name]
                src.seek(offset)
                while nbytes:
                    chunk = src.read(min(nbytes, self._CHUNK))
                    if not chunk:
                        raise CheckpointError(f"spool {self.path} ended early while copying {name!r}")
                    dst.write(chunk)
                    digest.update(chunk)
                    nbytes -= len(chunk)
        self.path.unlink()
        return digest.hexdigest()

    def close(self) -> None:
        """Drop the spool without assembling it (after a failure)."""
        self._fh.close()
        self.path.unlink(missing_ok=True)


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


def _build_skeleton(info: dict[str, Any]) -> nn.Module:
    if info.get("library") != "transformers":
        raise CheckpointError(
            f"checkpoint holds a {info.get('class')} that is not a transformers model; "
            "pass model=<an instance of that architecture> to load_checkpoint"
        )
    import transformers

    name = info.get("class")
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None:
        raise CheckpointError(f"transformers has no class {name!r} (installed {transformers.__version__})")
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(
            f"the manifest's model class {name!r} is not a transformers model class "
            "(e.g. LlamaForCausalLM, BertModel); the manifest is damaged or was edited"
        )
    cfg_dict = info.get("config")
    if not isinstance(cfg_dict, dict) or not isinstance(cfg_dict.get("model_type"), str):
        raise CheckpointError("the manifest's model config is not a transformers config with a 'model_type'")
    cfg_dict = dict(cfg_dict)
    try:
        config = transformers.AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
        model: nn.Module = cls(config)
    except Exception as exc:  # transformers raises many kinds for a config that does not fit
        raise CheckpointError(
            f"cannot build a {name} from the manifest's model config: {type(exc).__name__}: {exc}"
        ) from None
    return model


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    registry: Registry | None = None,
    device: str | torch.device = "cpu",
    verify: bool = True,
) -> nn.Module:
    """Rebuild a quantized model with its adapters. No original weights are needed.

    For transformers models the architecture is rebuilt from the stored config; for other
    models pass a freshly constructed ``model`` of the same architecture. Every layer is
    checked by its quantizer (see :func:`lqmod.quantize.validate_qweight`) and, with
    ``verify`` (the default), materialized once to check that it is finite.
    """
    path = Path(path)
    manifest = read_manifest(path)
    registry = registry or get_registry()
    try:
        lora = LoRAConfig.model_validate(manifest["lora"])
    except ValueError as exc:
        raise CheckpointError(f"{path / MANIFEST}: invalid LoRA config: {' '.join(str(exc).split())}") from None
    if model is None:
        model = _build_skeleton(manifest["model"])
    try:
        with safe_open(str(path / TENSORS), framework="pt", device=str(device)) as fh:
            stored = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path / TENSORS} cannot be read: {exc}") from None
    for alias, kept in manifest.get("aliases", {}).items():
        if kept not in stored:
            raise CheckpointError(f"alias {alias!r} names {kept!r}, which {TENSORS} does not hold")
        stored[alias] = stored[kept]
    if manifest["version"] < 3:
        stored = _flat_layer_keys_to_v3(stored, manifest["layers"])
    new_layers: dict[str, LoRALinear] = {}
    for name, header in manifest["layers"].items():
        what = f"{path}: layer {name!r}"
        spec = registry.quantizer(str(header.get("quantizer")))
        prefix = f"{name}."
        names = header.get("tensors")
        if not isinstance(names, list) or not all(isinstance(k, str) for k in names):
            raise CheckpointError(f"{what}: 'tensors' must list tensor names, got {names!r}")
        absent = [f"{prefix}adapter.{k}" for k in ("lora_A", "lora_B")]
        absent += [f"{prefix}base_layer.base.{k}" for k in names]
        absent = [k for k in absent if k not in stored]
        if header.get("bias") and f"{prefix}base_layer.bias" not in stored:
            absent.append(f"{prefix}base_layer.bias")
        if absent:
            raise CheckpointError(f"{what}: {TENSORS} lacks {absent[:5]}")
        layer_lora = _layer_lora_config(lora, header, what)
        adapter_spec = registry.adapter(layer_lora.adapter)
        try:
            qweight = QuantizedWeight.from_header(header, {k: stored[f"{prefix}base_layer.base.{k}"] for k in names})
            # The quantizer itself checks that the tensors are what its config describes.
            qweight = validate_qweight(spec, qweight, name=what)
            if verify:
                with torch.no_grad():
                    check_materialized(spec, qweight, spec.materialize(qweight, torch.float32), name=what)
            layer = LoRALinear(
                qweight,
                spec,
                layer_lora,
                lora_a=stored[f"{prefix}adapter.lora_A"],
                lora_b=stored[f"{prefix}adapter.lora_B"],
                bias=stored.get(f"{prefix}base_layer.bias") if header.get("bias") else None,
                adapter=adapter_spec,
            )
        except QuantizationError as exc:
            raise CheckpointError(str(exc)) from None
        except ValueError as exc:
            raise CheckpointError(f"{what}: {exc}") from None
        origin = header.get("origin", "linear")
        if origin not in ("linear", "conv1d"):
            raise CheckpointError(f"{what}: origin {origin!r} is not 'linear' or 'conv1d'")
        layer.origin = origin
        new_layers[name] = layer
    known = {n for n, _ in model.named_modules()}
    unknown = sorted(set(new_layers) - known)
    if unknown:
        raise CheckpointError(f"checkpoint layers {unknown[:5]} are not modules of the {type(model).__name__} model")
    for name, layer in new_layers.items():
        replace_module(model, name, layer)
    try:
        missing, unexpected = model.load_state_dict(stored, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise CheckpointError(f"checkpoint does not fit the model: {' '.join(str(exc).split())[:500]}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, layer in new_layers.items():
        if layer.adapter_spec.validate is not None:
            try:
                layer.adapter_spec.validate(layer.adapter)
            except ValueError as exc:
                raise CheckpointError(f"{path}: layer {name!r}: {exc}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in iter_lora_layers(model):
        for p in m.adapter.parameters():
            p.requires_grad_(True)
        if m.bias is not None:
            m.bias.requires_grad_(m.lora_config.train_bias)
    model.eval()
    return model.to(device)


def _flat_layer_keys_to_v3(stored: dict[str, torch.Tensor], layers: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename a version 1/2 checkpoint's layer tensors to the base_layer/adapter layout."""
    prefixes = [f"{name}." for name in layers]
    renamed: dict[str, torch.Tensor] = {}
    for key, t in stored.items():
        for prefix in prefixes:
            rest = key[len(prefix):] if key.startswith(prefix) else None
            if rest in ("lora_A", "lora_B"):
                key = f"{prefix}adapter.{rest}"
            elif rest == "bias" or (rest is not None and rest.startswith("base.")):
                key = f"{prefix}base_layer.{rest}"
            else:
                continue
            break
        renamed[key] = t
    return renamed


def _layer_lora_config(lora: LoRAConfig, header: Mapping[str, Any], what: str) -> LoRAConfig:
    """The checkpoint's LoRA config with this layer's recorded adapter variant (absent: "lora",
    what every checkpoint written before variants were recorded holds)."""
    name = header.get("adapter", "lora")
    config = header.get("adapter_config", {})
    if not isinstance(name, str) or not isinstance(config, dict):
        raise CheckpointError(
            f"{what}: 'adapter' must be a variant name and 'adapter_config' a JSON object, got {name!r}, {config!r}"
        )
    if name == lora.adapter and config == lora.adapter_config:
        return lora
    return lora.model_copy(update={"adapter": name, "adapter_config": config})


def export_peft(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapters in PEFT's LoRA format (``adapter_model.safetensors`` + config).

    Only variants whose spec has a :class:`~lqmod.types.PeftForm` can be exported (LoRA;
    DoRA as ``use_dora=True`` with its ``lora_magnitude_vector``); any other (IEC) is a
    ``ValueError`` naming the variants PEFT loads.

    The adapters were trained against the *quantized* base: apply them to
    :func:`dequantized_copy` of the model (or an equally quantized base) to get the same outputs.
    """
    layers = dict(iter_lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRALinear layers to export")
    lora = next(iter(layers.values())).lora_config
    variants = {m.adapter_name: m.adapter_spec for m in layers.values()}
    no_peft = sorted(v for v, spec in variants.items() if spec.peft is None)
    if no_peft:
        loadable = sorted(n for n, s in get_registry().adapters().items() if s.peft is not None)
        raise ValueError(
            f"PEFT cannot load the {', '.join(repr(v) for v in no_peft)} adapter variant; PEFT loads "
            f"{', '.join(loadable)}. Save an lqmod checkpoint (lqmod.io.save_checkpoint) instead"
        )
    if len(variants) > 1:
        raise ValueError(f"layers use several adapter variants {sorted(variants)}; a PEFT adapter holds one")
    form = next(iter(variants.values())).peft
    assert form is not None
    tensors: dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        for key, t in form.tensors(m.adapter).items():
            tensors[f"base_model.model.{name}.{key}"] = t.detach().contiguous().cpu()
    fan_in_fan_out = any(m.origin == "conv1d" for m in layers.values())
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(layers),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "modules_to_save": None,
        **dict(form.config),
    }
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_safetensors(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return Path(path)


def dequantized_copy(model: nn.Module, materialize_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of ``model`` whose adapted layers are plain dense layers holding the
    materialized quantized weight (adapters dropped): the base a PEFT export applies to."""
    import copy

    clone = copy.deepcopy(model)
    makers: dict[str, Callable[[LoRALinear], nn.Module]] = {"linear": _to_linear, "conv1d": _to_conv1d}
    for name, m in list(iter_lora_layers(clone)):
        replace_module(clone, name, makers[m.origin](m))
    return clone


def _to_linear(m: LoRALinear) -> nn.Module:
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(m.dense_weight(torch.float32))
        if m.bias is not None:
            lin.bias.copy_(m.bias)
    return lin


def _to_conv1d(m: LoRALinear) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(m.out_features, m.in_features)
    with torch.no_grad():
        conv.weight.copy_(m.dense_weight(torch.float32).t())
        if m.bias is not None:
            conv.bias.copy_(m.bias)
    return conv
