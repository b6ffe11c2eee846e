"""Triton kernels for :class:`~lqmod.kernels.formats.LutFormat` weights.

Importing this package does not import triton: the kernel modules (``lut_tile``,
``lut_matmul``, ``dequant``) are decorated with ``@triton.jit`` at import, and triton fixes
"compile for the GPU" versus "run in the CPU interpreter" at that moment, so they are
imported only through :func:`import_kernels`, which decides first.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

__all__ = ["device_kind", "import_kernels", "triton_available"]

_MATMUL = "lqmod.kernels.triton.lut_matmul"
_DEQUANT = "lqmod.kernels.triton.dequant"


def triton_available() -> bool:
    """Whether triton can be imported, without importing it."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken install, or one blocked via sys.modules
        return False


def device_kind(device: torch.device) -> str:
    """The capability key for ``device``: CPU tensors can only go through the interpreter."""
    return "interpreter" if device.type == "cpu" else device.type


def import_kernels(device: torch.device) -> tuple[ModuleType, ModuleType]:
    """The (lut_matmul, dequant) kernel modules, decorated for ``device``.

    CPU tensors need the interpreter; CUDA tensors get compiled kernels unless the user set
    ``TRITON_INTERPRET=1`` to debug. The first import fixes the mode for the process, so a
    later request for the other mode raises rather than silently running the wrong one.
    """
    interpret = device.type == "cpu" or _truthy(os.environ.get("TRITON_INTERPRET"))
    # triton itself is imported outside the switch: its own @jit helpers must stay in the
    # process-wide mode (our kernels do not call them), or later compiled kernels of other
    # libraries would find interpreted helpers.
    importlib.import_module("triton")
    with _env("TRITON_INTERPRET", "1" if interpret else None):
        matmul = importlib.import_module(_MATMUL)
        dequant = importlib.import_module(_DEQUANT)
    if interpret != matmul.INTERPRETED:
        mode = "the CPU interpreter" if matmul.INTERPRETED else "compiled GPU code"
        raise RuntimeError(
            f"lqmod's Triton kernels were already decorated for {mode} in this process and "
            f"cannot run on {device}. Set LQMOD_TRITON_INTERPRET=1 (or TRITON_INTERPRET=1) "
            "before the first use to run them on CPU."
        )
    return matmul, dequant


@contextmanager
def _env(key: str, value: str | None) -> Iterator[None]:
    # Only for the duration of our own imports: leaking TRITON_INTERPRET would switch every
    # other library's kernels decorated later in the process to the interpreter too.
    old = os.environ.get(key)
    if value is not None:
        os.environ[key] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                del os.environ[key]
            else:
                os.environ[key] = old


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")
