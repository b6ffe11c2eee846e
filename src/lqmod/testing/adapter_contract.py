"""The adapter contract: what every adapter variant plug-in must guarantee, as pytest tests.

A variant's author subclasses :class:`AdapterContract` in their own test suite::

    from lqmod.testing import AdapterContract

    class TestMyAdapterContract(AdapterContract):
        adapter = "mine"                       # the registered name
        configs = [{}, {"my_option": 2}]       # its adapter_config values to check

The base is the suite's own small quantizer (4-bit integers, one scale per row, defined
here, so the suite names no plug-in) with a bias; every check runs over it:

* registration: spec fields, config frozen and typo-proof through ``LoRAConfig.adapter_config``;
* step 0: with ``B = 0`` the adapted layer computes what its base computes;
* consistency: in float64, output and every gradient (input and each adapter parameter)
  equal those of ``x @ merged_weight(W).T + b``, the variant's own dense equivalent;
* ``torch.autograd.gradcheck`` in float64 over the input and every adapter parameter
  (those in ``Adapter.detached_params`` inside ``Adapter.pinned_detached``, plus a check of
  the others with nothing pinned);
* memory: no tensor as large as the dense weight is saved for backward, with and without dropout;
* training: only the adapter trains, the quantized tensors never change, the loss falls;
* state: a fresh layer loading the state dict computes bit-identical outputs, ``validate``
  accepts it and refuses a non-finite one; a checkpoint records the variant and reloads it;
* PEFT: a variant with a ``PeftForm`` exports an adapter that PEFT applies to the dense copy
  with the same outputs; one without is refused by :func:`lqmod.io.export_peft` with a message
  naming the variants PEFT loads;
* bfloat16: ``layer.to(torch.bfloat16)`` runs and stays close to float32.
"""

from __future__ import annotations

from lqmod.testing.adapter_checks import AdapterValueChecks
from lqmod.testing.adapter_quantizer import CONTRACT_QUANTIZER as CONTRACT_QUANTIZER
from lqmod.testing.adapter_quantizer import contract_quantizer_spec as contract_quantizer_spec
from lqmod.testing.adapter_state_checks import AdapterStateChecks

__all__ = ["CONTRACT_QUANTIZER", "AdapterContract", "contract_quantizer_spec"]


# pytest collects inherited tests in reverse method-resolution order: the parts are listed
# last first so that the tests run in the order they are read (registration ... PEFT).
class AdapterContract(AdapterStateChecks, AdapterValueChecks):
    """Subclass in a ``Test*`` class and set :attr:`adapter` (and, if it has options, :attr:`configs`).

    The settings and hooks are documented on :class:`~lqmod.testing.adapter_base.AdapterContractBase`;
    the checks live in :mod:`~lqmod.testing.adapter_checks` and :mod:`~lqmod.testing.adapter_state_checks`.
    """
