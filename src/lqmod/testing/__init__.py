"""Test helpers for lqmod plug-ins: the contract suite every quantizer should pass.

Imported only by test suites (it needs pytest); ``import lqmod`` does not import it.
See :class:`QuantizerContract` (and :class:`InitializerContract` for LoRA initializers) for how a
plug-in runs the suite against itself.
"""

from __future__ import annotations

from lqmod.testing.contract import QuantizerContract, dense_sized_saved_tensors, relative_error
from lqmod.testing.initializer_contract import InitializerContract

__all__ = ["InitializerContract", "QuantizerContract", "dense_sized_saved_tensors", "relative_error"]
