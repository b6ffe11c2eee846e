"""The quantizer contract: what every quantizer plug-in must guarantee, as pytest tests.

A plug-in author subclasses :class:`QuantizerContract` in their own test suite::

    from lqmod.testing import QuantizerContract

    class TestMyQuantizerContract(QuantizerContract):
        quantizer = "mine"                             # the registered name
        configs = [{"bits": 4}, {"bits": 2, "group_size": 32}]
        shape = (48, 256)                              # optional: (out_features, in_features)
        max_relative_error = 0.5                       # optional: or override relative_error_bound()

Every ``test_*`` method that takes ``config`` runs once per entry of ``configs`` (dicts or
config instances); those taking ``dtype`` run once per entry of ``materialize_dtypes``;
those taking ``weight_kind`` once per hard test weight (``"outliers"``: a few entries 25-60
standard deviations out; ``"heavy-tailed"``: Student-t with 2 degrees of freedom;
``"real"``: a block of a trained all-MiniLM-L6-v2 matrix, skipped where that model is not
installed).

Beyond shape, dtype and storage bookkeeping, the suite checks that ``quantize`` is
deterministic (twice the same call, the same bits) and, unless
``thread_count_independent = False`` says otherwise (and the plug-in documents it),
independent of ``torch.set_num_threads``; and that the ``validate`` hook accepts the
quantizer's own output and refuses it under a config with another bit width.
Quantizers that need calibration statistics override :meth:`QuantizerContract.stats`; a
quantizer that is not installed through an entry point can override
:meth:`QuantizerContract.get_spec`.

The checks are written as plain methods taking explicit arguments (the fixtures only build
those arguments), so they can also be called directly, e.g. to show that a deliberately
broken quantizer fails them.
"""

from __future__ import annotations

from lqmod.testing.comparisons import dense_sized_saved_tensors, relative_error
from lqmod.testing.hard_weights import REAL_WEIGHT as REAL_WEIGHT
from lqmod.testing.hard_weights import WEIGHT_KINDS as WEIGHT_KINDS
from lqmod.testing.layer_checks import LayerChecks
from lqmod.testing.materialize_checks import MaterializeChecks
from lqmod.testing.quantize_checks import QuantizeChecks
from lqmod.testing.quantizer_base import ConfigLike as ConfigLike

__all__ = ["QuantizerContract", "dense_sized_saved_tensors", "relative_error"]


# pytest collects inherited tests in reverse method-resolution order: the parts are listed
# last first so that the tests run in the order they are read (quantize ... options).
class QuantizerContract(LayerChecks, MaterializeChecks, QuantizeChecks):
    """Subclass in a ``Test*`` class and set :attr:`quantizer` (and usually :attr:`configs`).

    The settings and hooks are documented on
    :class:`~lqmod.testing.quantizer_base.QuantizerContractBase`; the checks live in
    :mod:`~lqmod.testing.quantize_checks`, :mod:`~lqmod.testing.materialize_checks` and
    :mod:`~lqmod.testing.layer_checks`.
    """
