"""An on-disk cache of calibration statistics, reusable across runs.

Layout: ``<root>/<key>/stats.safetensors`` (every tensor) and ``manifest.json`` (layer ->
tensor names and token counts, the file's size and sha256, the caller's metadata). An
entry is written into a temporary directory and moved into place with ``os.replace``, so
a reader never sees half an entry; on load the file's size and sha256 are checked before
safetensors parses it, so a truncated or corrupt entry is a miss (with a warning), never a
crash inside the parser. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lqmod.types import LayerStats

__all__ = ["CACHE_ENV", "MANIFEST_VERSION", "StatsCache", "default_cache_root"]

CACHE_ENV = "LQMOD_CACHE"
MANIFEST_VERSION = 1
_FIELDS = ("hessian", "fisher", "act_absmean")
_STATS_FILE = "stats.safetensors"
_MANIFEST = "manifest.json"


def default_cache_root() -> Path:
    """``$LQMOD_CACHE`` if set, else ``~/.cache/lqmod/stats``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lqmod" / "stats"


def _hash_tensor(h: Any, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _hash_value(h: Any, name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        _hash_tensor(h, name, value)
    elif isinstance(value, Mapping):
        for k in sorted(value, key=str):
            _hash_value(h, f"{name}.{k}", value[k])
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _hash_value(h, f"{name}[{i}]", v)
    else:
        h.update(f"{name}={json.dumps(value, sort_keys=True, default=repr)}|".encode())


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class StatsCache:
    """Calibration statistics on disk, keyed by model weights, text and kind.

    ``key(...)`` hashes every parameter and buffer of ``model`` (statistics of a layer depend
    on all the layers before it, not only on its own weight), the ``names`` asked for, every
    tensor of every batch, ``kind`` and ``extra``: a changed weight or different text gives a
    different key.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_root()

    def key(
        self,
        model: nn.Module,
        names: Sequence[str],
        batches: Sequence[Mapping[str, Any]],
        kind: str,
        **extra: Any,
    ) -> str:
        h = hashlib.sha256(f"lqmod.stats/{MANIFEST_VERSION}|{type(model).__qualname__}|{kind}|".encode())
        _hash_value(h, "extra", extra)
        _hash_value(h, "names", list(names))
        for name, t in model.state_dict(keep_vars=False).items():
            if isinstance(t, torch.Tensor):
                _hash_tensor(h, name, t)
        for i, batch in enumerate(batches):
            _hash_value(h, f"batch{i}", dict(batch))
        return h.hexdigest()

    def path(self, key: str) -> Path:
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key must be a lower-case hex digest (from StatsCache.key), got {key!r}")
        return self.root / key

    def load(self, key: str) -> dict[str, LayerStats] | None:
        """The cached statistics, or None when absent or damaged (damage also warns)."""
        folder = self.path(key)
        if not folder.is_dir():
            return None
        try:
            return self._read(folder)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            warnings.warn(f"ignoring damaged statistics cache entry {folder}: {exc}", RuntimeWarning, stacklevel=2)
            return None

    def manifest(self, key: str) -> dict[str, Any] | None:
        path = self.path(key) / _MANIFEST
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    @staticmethod
    def _read(folder: Path) -> dict[str, LayerStats]:
        manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
        path = folder / _STATS_FILE
        size = path.stat().st_size
        if size != manifest["file"]["size"]:
            raise ValueError(f"{_STATS_FILE} has {size} bytes, the manifest says {manifest['file']['size']}")
        if _file_sha256(path) != manifest["file"]["sha256"]:
            raise ValueError(f"{_STATS_FILE} does not match its sha256 in the manifest")
        tensors = load_file(path)
        out: dict[str, LayerStats] = {}
        for name, layer in manifest["layers"].items():
            fields = {f: tensors[f"{name}/{f}"] for f in layer["fields"]}
            out[name] = LayerStats(n_tokens=int(layer["n_tokens"]), **fields)
        return out

    def save(self, key: str, stats: Mapping[str, LayerStats], meta: Mapping[str, Any] | None = None) -> None:
        """Write ``stats`` under ``key`` atomically (replacing an older entry)."""
        final = self.path(key)
        self.root.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        layers: dict[str, Any] = {}
        seen: set[int] = set()
        for name, s in stats.items():
            fields = []
            for f in _FIELDS:
                t = getattr(s, f)
                if t is not None:
                    t = t.detach().cpu().contiguous()
                    # safetensors refuses tensors sharing memory (one act_absmean given to two layers).
                    ptr = t.untyped_storage().data_ptr()
                    tensors[f"{name}/{f}"] = t.clone() if ptr in seen else t
                    seen.add(ptr)
                    fields.append(f)
            layers[name] = {"n_tokens": int(s.n_tokens), "fields": fields}
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=self.root))
        try:
            save_file(tensors, tmp / _STATS_FILE)
            manifest = {
                "version": MANIFEST_VERSION,
                "key": key,
                "file": {"size": (tmp / _STATS_FILE).stat().st_size, "sha256": _file_sha256(tmp / _STATS_FILE)},
                "layers": layers,
                "meta": dict(meta or {}),
            }
            (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=repr), encoding="utf-8")
            if final.exists():
                # os.replace cannot overwrite a non-empty directory: move the old one aside first.
                old = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", suffix=".old", dir=self.root))
                os.replace(final, old / "entry")
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def get_or_compute(self, key: str, compute: Callable[[], dict[str, LayerStats]]) -> dict[str, LayerStats]:
        cached = self.load(key)
        if cached is not None:
            return cached
        stats = compute()
        self.save(key, stats)
        return stats
