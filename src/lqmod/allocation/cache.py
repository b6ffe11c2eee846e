"""On-disk cache of error-table rows, one small JSON file per (weight, statistics, weighting).

Every computed option is written at once (temp file + ``os.replace``), so an interrupted
table build resumes where it stopped and a repeated one quantizes nothing. Keys are content
hashes: a changed weight or changed statistics is a different file, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from lqmod.types import LayerStats

__all__ = ["CACHE_ENV", "TableCache", "default_cache_root", "stats_hash", "tensor_hash"]

CACHE_ENV = "LQMOD_CACHE"
FORMAT_VERSION = 1


def default_cache_root() -> Path:
    """``$LQMOD_CACHE`` or ``~/.cache/lqmod``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lqmod"


def _update_with_tensor(h: Any, tensor: torch.Tensor) -> None:
    t = tensor.detach().contiguous().cpu()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    # Viewed as bytes so every dtype (bfloat16 included) hashes its exact bit pattern.
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def tensor_hash(tensor: torch.Tensor) -> str:
    h = hashlib.sha256()
    _update_with_tensor(h, tensor)
    return h.hexdigest()


def stats_hash(stats: LayerStats | None) -> str:
    """A hash of every statistic present (what a quantizer and the error weighting may read)."""
    if stats is None:
        return "none"
    h = hashlib.sha256()
    for f in fields(stats):
        value = getattr(stats, f.name)
        if value is None:
            continue
        h.update(f"{f.name}=".encode())
        if isinstance(value, torch.Tensor):
            _update_with_tensor(h, value)
        else:
            h.update(repr(value).encode())
        h.update(b";")
    return h.hexdigest()


class TableCache:
    """Rows of one matrix live in ``<root>/error-table/<weight[:2]>/<weight>-<stats>-<weighting>.json``."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        self.dir = self.root / "error-table"

    def _path(self, weight_hash: str, stats_key: str, weighting: str) -> Path:
        return self.dir / weight_hash[:2] / f"{weight_hash}-{stats_key[:32]}-{weighting}.json"

    def load(self, weight_hash: str, stats_key: str, weighting: str) -> dict[str, dict[str, Any]]:
        """Cached records (option key -> record) of a matrix; empty when none or unreadable."""
        path = self._path(weight_hash, stats_key, weighting)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}  # absent, or damaged by something other than us: recompute
        if (
            not isinstance(data, dict)
            or data.get("format") != FORMAT_VERSION
            or data.get("weight") != weight_hash
            or data.get("stats") != stats_key
            or not isinstance(data.get("records"), dict)
        ):
            return {}
        return dict(data["records"])

    def save(self, weight_hash: str, stats_key: str, weighting: str, records: dict[str, dict[str, Any]]) -> None:
        """Write all records of a matrix atomically (a reader sees the old file or the new one)."""
        path = self._path(weight_hash, stats_key, weighting)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT_VERSION,
            "weight": weight_hash,
            "stats": stats_key,
            "weighting": weighting,
            "records": records,
        }
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o644)  # a shared cache directory stays readable, as plain writes would be
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
