"""The modes of ``lqmod bench``: ``lqmod bench <mode> ...`` beside the plain quantizer matrix.

A mode is a module here with ``register(modes)``, adding its sub-parser (with
``set_defaults(func=...)``) to the ``bench`` parser's mode sub-parsers; listing it in
:data:`MODES` wires it in. Each mode's work lives in its own modules of :mod:`lqmod.bench`.
Mode options go after the mode's name (``lqmod bench init --model smollm2``).
"""

from __future__ import annotations

import argparse
import importlib

__all__ = ["MODES", "register_modes"]

MODES: tuple[str, ...] = ("init", "adapters", "icq")


def register_modes(modes: argparse._SubParsersAction) -> None:
    for name in MODES:
        importlib.import_module(f"{__name__}.{name}").register(modes)
