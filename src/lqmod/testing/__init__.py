"""Test helpers for lqmod plug-ins: the contract suites every quantizer and adapter variant should pass.

Imported only by test suites (it needs pytest); ``import lqmod`` does not import it.
See :class:`QuantizerContract`, :class:`AdapterContract` and :class:`InitializerContract` (LoRA
initializers) for how a plug-in runs a suite against itself.
"""

from __future__ import annotations

from lqmod.testing.adapter_contract import AdapterContract
from lqmod.testing.contract import QuantizerContract, dense_sized_saved_tensors, relative_error
from lqmod.testing.initializer_contract import InitializerContract

__all__ = ["AdapterContract", "InitializerContract", "QuantizerContract", "dense_sized_saved_tensors", "relative_error"]
