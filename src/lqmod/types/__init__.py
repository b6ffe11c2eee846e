"""The data that crosses the plug-in boundary.

Registrations are frozen dataclasses (conda-style typed registrations): a plug-in's hook
returns them, the manager indexes them by name, and the hot path keeps direct references
to their callables.

Modules: :mod:`~lqmod.types.weights` (``QuantizedWeight``, ``LayerStats``),
:mod:`~lqmod.types.quantizers`, :mod:`~lqmod.types.initializers`, :mod:`~lqmod.types.adapters`,
:mod:`~lqmod.types.allocation`.
"""

from __future__ import annotations

from lqmod.types.adapters import AdapterSpec, PeftForm
from lqmod.types.adapters import BuildAdapter as BuildAdapter
from lqmod.types.allocation import AllocationProblem, AllocationResult, AllocatorSpec, Candidate, InfeasibleBudget
from lqmod.types.initializers import InitFn as InitFn
from lqmod.types.initializers import InitializerSpec, InitResult
from lqmod.types.quantizers import Materialize as Materialize
from lqmod.types.quantizers import Option, QuantizerSpec, TensorLayout, check_tensor_layout
from lqmod.types.quantizers import Quantize as Quantize
from lqmod.types.quantizers import Validate as Validate
from lqmod.types.weights import JSONValue as JSONValue
from lqmod.types.weights import LayerStats, QuantizedWeight
from lqmod.types.weights import packed_nbytes as packed_nbytes

__all__ = [
    "AdapterSpec",
    "AllocationProblem",
    "AllocationResult",
    "AllocatorSpec",
    "Candidate",
    "InfeasibleBudget",
    "InitResult",
    "InitializerSpec",
    "LayerStats",
    "Option",
    "PeftForm",
    "QuantizedWeight",
    "QuantizerSpec",
    "TensorLayout",
    "check_tensor_layout",
]
