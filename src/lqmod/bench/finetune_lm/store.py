"""The benchmark's files: digests, atomic JSON writes, row files and the cache folder."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    """``$LQMOD_CACHE/finetune_lm`` if set, else ``~/.cache/lqmod/finetune_lm``."""
    env = os.environ.get("LQMOD_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "lqmod") / "finetune_lm"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dump(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=False, allow_nan=True, default=str) + "\n"


def _lqmod_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lqmod")
    except metadata.PackageNotFoundError:
        return "unknown"


def _row_file(out: Path, name: str) -> Path:
    return out / "rows" / f"{name}.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
