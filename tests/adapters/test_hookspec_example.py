"""The ``lqmod_adapters`` hookspec's example plug-in runs as written and passes the adapter contract."""

from __future__ import annotations

import textwrap
import types

import torch

from lqmod import hookspecs
from lqmod.plugins import Registry
from lqmod.testing import AdapterContract
from lqmod.types import AdapterSpec


def _example_spec() -> AdapterSpec:
    doc = hookspecs.lqmod_adapters.__doc__
    assert doc is not None
    code = textwrap.dedent(doc.split("::", 1)[1])
    module = types.ModuleType("gated_example")
    exec(compile(code, "<lqmod_adapters example>", "exec"), module.__dict__)
    registry = Registry(autoload=False)
    registry.register(module, name="gated-example")
    return registry.adapter("gated")


class _GatedContract(AdapterContract):
    adapter = "gated"

    def get_spec(self) -> AdapterSpec:
        return _example_spec()


def test_the_documented_example_passes_the_core_checks() -> None:
    c = _GatedContract()
    spec = c.get_spec()
    c.test_spec_is_well_formed(spec)
    c.test_layer_holds_the_variant(spec, {})
    c.test_step_zero_with_zero_b_equals_the_base(spec, {})
    c.test_forward_and_gradients_match_merged_weight_in_float64(spec, {})
    c.test_gradcheck_in_float64(spec, {})
    c.test_no_dense_weight_is_saved_for_backward(spec, {}, 0.0)
    layer = c.make_layer(spec, {})
    assert tuple(layer.adapter.get_parameter("gate").shape) == (1,)
    assert torch.isfinite(layer(c.make_input())).all()
