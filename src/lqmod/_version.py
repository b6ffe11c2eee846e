"""lqmod's version: the installed distribution's metadata, so it is defined once (pyproject.toml)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

__all__ = ["UNKNOWN", "lqmod_version"]

UNKNOWN = "0+unknown"


def lqmod_version() -> str:
    """The installed lqmod's version; for a never-installed source tree, its pyproject.toml's."""
    try:
        return metadata.version("lqmod")
    except metadata.PackageNotFoundError:
        pass
    # Run from a checkout on PYTHONPATH (src/lqmod/_version.py -> ../../pyproject.toml): read the
    # static version there rather than report nothing. A regex, not tomllib (Python >= 3.11 only).
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return UNKNOWN
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    if project is None or not re.search(r'^name\s*=\s*"lqmod"\s*$', project.group(1), re.MULTILINE):
        return UNKNOWN
    found = re.search(r'^version\s*=\s*"([^"]+)"\s*$', project.group(1), re.MULTILINE)
    return found.group(1) if found else UNKNOWN
