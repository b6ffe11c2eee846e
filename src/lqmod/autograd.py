"""The materialize-in-forward-and-backward linear map (ModuLoRA's trick).

For ``y = x W^T`` with a frozen quantized ``W``:

* forward materializes ``W`` from its stored tensors, computes ``y`` and lets ``W`` go;
* the chain rule needs only ``dL/dx = dL/dy W`` (``W`` is frozen, so no ``dL/dW``), so
  backward materializes ``W`` again from the same stored tensors.

Only the quantized tensors (already resident in the module) are saved for backward, never
``x`` nor the dense ``W``: activation memory of the base path is zero.
"""

from __future__ import annotations

from typing import Any

import torch

from lqmod.kernels.base import KernelBackend
from lqmod.types import Materialize, QuantizedWeight

__all__ = ["materialized_linear"]


class _MaterializedLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        backend: KernelBackend,
        materialize: Materialize,
        template: QuantizedWeight,
        names: tuple[str, ...],
        *tensors: torch.Tensor,
    ) -> torch.Tensor:
        qweight = _with_tensors(template, names, tensors)
        ctx.save_for_backward(*tensors)
        ctx.backend, ctx.materialize, ctx.template, ctx.names = backend, materialize, template, names
        return backend.linear(x, qweight, materialize)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x = None
        if ctx.needs_input_grad[0]:
            qweight = _with_tensors(ctx.template, ctx.names, ctx.saved_tensors)
            grad_x = ctx.backend.linear_t(grad_out, qweight, ctx.materialize)
        return (grad_x, None, None, None, None, *([None] * len(ctx.names)))


def _with_tensors(
    template: QuantizedWeight, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]
) -> QuantizedWeight:
    return QuantizedWeight(
        template.quantizer,
        template.config,
        template.shape,
        dict(zip(names, tensors, strict=True)),
        template.meta,
        template.dtype,
    )


def materialized_linear(
    x: torch.Tensor,
    qweight: QuantizedWeight,
    materialize: Materialize,
    backend: KernelBackend,
    *,
    save_dense: bool = False,
) -> torch.Tensor:
    """``x @ W.T`` where ``W = materialize(qweight)``, differentiable in ``x`` only.

    With ``save_dense=True`` the weight is materialized once under ordinary autograd, which
    keeps the dense ``W`` saved for backward: the QLoRA-style baseline, kept for comparison.
    """
    if save_dense:
        return torch.nn.functional.linear(x, materialize(qweight, x.dtype))
    names = tuple(qweight.tensors)
    tensors = tuple(qweight.tensors[n] for n in names)
    out: torch.Tensor = _MaterializedLinear.apply(x, backend, materialize, qweight, names, *tensors)
    return out
