"""Every hook lqmod calls, grouped by phase.

All hooks are *registration* hooks: they take no arguments and return an iterable of frozen
spec objects. They are called once, when the registry is built; the quantize/materialize
hot path then holds the returned callables directly and never goes back through pluggy.
None of them is ``firstresult`` or ``historic``: every plug-in's registrations are collected.
A name registered twice is dropped and reported, and using it is an error naming both
distributions. A hook that raises, or yields anything but its spec type, is reported and
that plug-in's registrations of the kind skipped; a ``@lqmod.hookimpl`` function whose name
is not one of the hooks below (a misspelling) makes the plug-in fail to load, with the
closest hook name suggested. ``LQMOD_DISABLE_PLUGINS=name,...`` skips plug-ins by
entry-point or distribution name.

A plug-in is a module (or object) with functions marked ``@lqmod.hookimpl``, announced in
its distribution's ``pyproject.toml``::

    [project.entry-points.lqmod]
    my-quantizer = "my_package.plugin"
"""

from __future__ import annotations

from collections.abc import Iterable

import pluggy

from lqmod.types import AdapterSpec, AllocatorSpec, InitializerSpec, QuantizerSpec

hookspec = pluggy.HookspecMarker("lqmod")

# -- phase 1: quantization ---------------------------------------------------------------


@hookspec
def lqmod_quantizers() -> Iterable[QuantizerSpec]:  # type: ignore[empty-body]
    """Register quantizers.

    Every :class:`~lqmod.types.QuantizerSpec` should declare ``validate(qweight, config)``:
    the core calls it on every weight loaded from a checkpoint and refuses the checkpoint,
    naming the layer, when it raises (see :func:`lqmod.types.check_tensor_layout`). In
    ``materialize``, ``qweight.config`` is a plain dict (JSON data); ``quantize``,
    ``bits_per_param`` and ``validate`` get the validated config model instance.
    ``bits_per_param`` raises :class:`lqmod.QuantizationError` for an option that does not
    fit a shape, and allocators skip it.

    Example (a complete plug-in quantizing to sign bits with one scale per row)::

        import torch
        import lqmod
        from lqmod.config import QuantizerConfig
        from lqmod.types import QuantizedWeight, QuantizerSpec, check_tensor_layout

        class SignConfig(QuantizerConfig):
            pass

        def quantize(w, cfg, stats):
            scale = w.abs().mean(dim=1, keepdim=True).float()
            signs = (w >= 0).to(torch.uint8)  # one byte per code: an honest (unpacked) cost
            return QuantizedWeight("sign", cfg.model_dump(), tuple(w.shape),
                                   {"signs": signs, "scale": scale})

        def materialize(qw, dtype):
            t = qw.tensors
            return ((t["signs"].to(dtype) * 2 - 1) * t["scale"].to(dtype))

        def validate(qw, cfg):
            out_f, in_f = qw.shape
            check_tensor_layout(qw, {"signs": ((out_f, in_f), torch.uint8),
                                     "scale": ((out_f, 1), torch.float32)})

        @lqmod.hookimpl
        def lqmod_quantizers():
            yield QuantizerSpec("sign", SignConfig, quantize, materialize,
                                bits_per_param=lambda cfg, shape: 8 + 32 / shape[1],
                                validate=validate, description="sign bits, one scale per row")
    """


# -- phase 2: adapter initialisation -----------------------------------------------------


@hookspec
def lqmod_initializers() -> Iterable[InitializerSpec]:  # type: ignore[empty-body]
    """Register LoRA initializers.

    Example (A small Gaussian, B zero, so the step-0 model equals the quantized one)::

        @lqmod.hookimpl
        def lqmod_initializers():
            def init(*, weight, qweight, materialize, lora, config, stats, generator):
                out_f, in_f = qweight.shape
                a = torch.randn(lora.r, in_f, generator=generator) / in_f ** 0.5
                return InitResult(a, torch.zeros(out_f, lora.r))
            yield InitializerSpec("tiny", InitializerConfig, init)
    """


# -- phase 2b: adapter variants ----------------------------------------------------------


@hookspec
def lqmod_adapters() -> Iterable[AdapterSpec]:  # type: ignore[empty-body]
    """Register adapter variants: the trainable module beside a frozen quantized base.

    ``LoRAConfig.adapter`` names the variant (``"lora"`` by default) and
    ``LoRAConfig.adapter_config`` its options; checkpoints record it per layer. An adapter
    subclasses :class:`lqmod.nn.adapter.Adapter`: ``forward(x, base_out, base)`` gets the
    base's output ``x W^T`` (no bias; ``base`` can materialize ``W`` again, e.g. for a norm)
    and returns the adapted output; ``merged_weight(weight)`` is the dense equivalent, used
    for merging, export and the contract suite (:class:`lqmod.testing.AdapterContract`).

    Example (LoRA whose update is scaled by one extra learnable scalar)::

        import torch
        from torch import nn
        import lqmod
        from lqmod.config import AdapterConfig
        from lqmod.nn.adapter import Adapter
        from lqmod.types import AdapterSpec

        class Gated(Adapter):
            def __init__(self, lora, lora_a, lora_b):
                super().__init__(lora, lora_a, lora_b)
                self.gate = nn.Parameter(torch.ones(1))

            def forward(self, x, base_out, base):
                return base_out + self.gate * self.lora_update(x).to(base_out.dtype)

            def merged_weight(self, weight):
                return weight + self.gate * self.scaling * (self.lora_B @ self.lora_A).to(weight.dtype)

        @lqmod.hookimpl
        def lqmod_adapters():
            def build(*, base, lora, config, lora_a, lora_b):
                return Gated(lora, lora_a, lora_b)
            yield AdapterSpec("gated", AdapterConfig, build, description="LoRA times a learnable gate")
    """


# -- phase 3: budget allocation ----------------------------------------------------------


@hookspec
def lqmod_allocators() -> Iterable[AllocatorSpec]:  # type: ignore[empty-body]
    """Register allocators that choose one option per matrix under a storage budget.

    ``allocate(problem, config)`` gets an :class:`~lqmod.types.AllocationProblem` (per
    matrix the valid candidates ``(option, error, bits)``, their parameter counts, and
    ``budget_bits``) and returns an :class:`~lqmod.types.AllocationResult`: the chosen
    candidate index of every matrix, with a status. It raises
    :class:`~lqmod.types.InfeasibleBudget` when even the cheapest choice does not fit.

    Example (always the cheapest option)::

        from lqmod.config import FrozenModel
        from lqmod.types import AllocationResult, AllocatorSpec

        @lqmod.hookimpl
        def lqmod_allocators():
            def cheapest(problem, config):
                problem.check_feasible()
                choice = {name: min(range(len(rows)), key=lambda i: rows[i].bits)
                          for name, rows in problem.candidates.items()}
                return AllocationResult(choice, status="heuristic")
            yield AllocatorSpec("cheapest", FrozenModel, cheapest)
    """
