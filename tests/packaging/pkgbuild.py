"""Building lqmod's sdist and wheel from a clean copy of the tree (used by conftest.py's fixtures).

Builds never run in the checkout itself: setuptools reuses ``build/`` and the old
``*.egg-info/SOURCES.txt`` it finds there, so a stale file (a deleted module, the example
plug-in's sources) could reach the archives and hide, or fake, a packaging bug. The copy holds
the files git would give a fresh clone (tracked plus new, not ignored ones). The wheel is
built from the unpacked sdist, as ``python -m build`` does, so the sdist is shown to be
complete; a second wheel is built from the tree directly, as ``pip wheel .`` does (the
path that shipped the stray folder). The builds call setuptools' PEP 517 hooks in this environment (no isolation, no
download): it has the setuptools pyproject.toml asks for.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Built:
    source: Path  # the clean copy of the tree the sdist was built from
    sdist: Path
    wheel: Path  # built from the unpacked sdist (python -m build)
    tree_wheel: Path  # built from the tree itself (pip wheel .), in its own folder

    def wheels(self) -> dict[str, Path]:
        return {"from sdist": self.wheel, "from tree": self.tree_wheel}


def source_files() -> list[str] | None:
    """Paths (relative, POSIX) a fresh clone would have plus new files; None without git."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode()
    return sorted({p for p in out.split("\0") if p and (REPO / p).is_file()})


def _hook(hook: str, cwd: Path, out_dir: Path) -> Path:
    code = f"import sys, setuptools.build_meta as b; print(b.{hook}(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(out_dir)], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{hook} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return out_dir / proc.stdout.strip().splitlines()[-1]


def build(files: list[str], root: Path) -> Built:
    """Copy ``files`` from the checkout under ``root``, build the sdist, then the wheel from it."""
    source = root / "source"
    for rel in files:
        dst = source / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dst)
    dist = root / "dist"
    dist.mkdir()
    sdist = _hook("build_sdist", source, dist)
    unpacked = root / "unpacked"
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # refuse links and absolute paths where Python can
            tar.extractall(unpacked, filter="data")
        else:
            tar.extractall(unpacked)
    (top,) = unpacked.iterdir()
    wheel = _hook("build_wheel", top, dist)
    tree_dist = root / "dist-tree"
    tree_dist.mkdir()
    return Built(source, sdist, wheel, _hook("build_wheel", source, tree_dist))


# Progress bars other libraries draw while lqmod works; lqmod's commands must not show them.
THIRD_PARTY_BARS = ("Loading weights", "Loading checkpoint shards", "Writing model shards", "Fetching", "Downloading")
_BAR = re.compile(r"^(?P<desc>[^:|]*): *\d+%\|")


def noise_lines(stderr: str) -> list[str]:
    """Lines of ``stderr`` that are not one of lqmod's own tqdm progress bars."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", stderr) if ln.strip()]
    out = []
    for ln in lines:
        bar = _BAR.match(ln)
        if bar is None or bar["desc"].strip().startswith(THIRD_PARTY_BARS):
            out.append(ln)
    return out
