"""Directories written to a temporary sibling and renamed into place, and recovery of
overwrites whose process died between their two renames (see :mod:`lqmod.io`)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
