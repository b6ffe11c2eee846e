"""Test helpers for lqmod plug-ins: the contract suites every quantizer and adapter variant should pass.

Imported only by test suites (it needs pytest); ``import lqmod`` does not import it.
See :class:`QuantizerContract` and :class:`AdapterContract` for how a plug-in runs a suite
against itself.
"""

from __future__ import annotations

from lqmod.testing.adapter_contract import AdapterContract
from lqmod.testing.contract import QuantizerContract, dense_sized_saved_tensors, relative_error

__all__ = ["AdapterContract", "QuantizerContract", "dense_sized_saved_tensors", "relative_error"]
