"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over lqmod's quantized bases.

An lqmod layer keeps its quantized weight as plain buffers, which ``fully_shard`` does not
shard (it shards parameters): every process would hold the whole quantized model. Here the
buffers of each :class:`~lqmod.nn.quantized_linear.QuantizedLinear` base become one frozen
parameter, a :class:`ShardedQuantizedTensor`: a tensor subclass that *presents* the dense
``(out, in)`` shape to FSDP but holds the quantizer's own tensors, and implements the ops
FSDP2 applies to a parameter it shards (``chunk``/``split``, ``new_zeros``, ``narrow``,
``copy_``, ``view``, ``as_strided``, ``detach``, ``_to_copy`` ...) plus the two all-gather
extension hooks:

* ``fsdp_pre_all_gather`` hands FSDP the local shard's inner tensors (one all-gather input
  each, in their own dtypes: packed codes, scales ...);
* ``fsdp_post_all_gather`` wraps the gathered tensors back into a full quantized weight,
  as views of FSDP's all-gather buffers, so FSDP can free and re-gather them (forward, then
  backward) and every saved view sees the data again.

A shard is not a block of rows: each inner tensor is flattened, padded to a multiple of the
world size and cut into equal pieces. Quantization blocks need not align with shards,
because a frozen base is never computed on in sharded form (no gradient, no optimizer
state, no reduce-scatter); it is only ever all-gathered whole, and the quantizer's
``materialize`` then runs on the whole weight exactly as without FSDP. So this works for
any plug-in's tensors, whatever their layout (block-wise scales, global codebooks,
permutations). See ``docs/fsdp2.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lqmod.nn.quantized_linear import QuantizedBase, QuantizedLinear
from lqmod.types import QuantizedWeight

__all__ = ["ShardableQuantizedBase", "ShardedQuantizedTensor", "make_bases_shardable"]

aten = torch.ops.aten


@dataclass(frozen=True)
class _Layout:
    """What the flat inner tensors are: names, true element counts and shapes, and the
    quantized weight's metadata (everything of a :class:`QuantizedWeight` but its tensors)."""

    names: tuple[str, ...]
    numels: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    template: QuantizedWeight
    rows: int  # logical rows of the full (unsharded) weight


class ShardedQuantizedTensor(torch.Tensor):
    """A quantized weight as one tensor of the dense shape, whose data are the quantizer's
    flattened tensors (the whole of them, or one FSDP shard of each)."""

    parts: tuple[torch.Tensor, ...]
    qlayout: _Layout

    @staticmethod
    def __new__(cls, inner: tuple[torch.Tensor, ...], layout: _Layout, size: torch.Size,
                dtype: torch.dtype) -> ShardedQuantizedTensor:
        t = torch.Tensor._make_wrapper_subclass(cls, size, dtype=dtype, device=inner[0].device, requires_grad=False)
        return t

    def __init__(self, inner: tuple[torch.Tensor, ...], layout: _Layout, size: torch.Size,
                 dtype: torch.dtype) -> None:
        self.parts = tuple(inner)
        self.qlayout = layout

    @classmethod
    def from_qweight(cls, qweight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> ShardedQuantizedTensor:
        names = tuple(sorted(qweight.tensors))
        tensors = [qweight.tensors[n] for n in names]
        template = QuantizedWeight(qweight.quantizer, qweight.config, qweight.shape, {}, qweight.meta, qweight.dtype)
        layout = _Layout(names, tuple(t.numel() for t in tensors), tuple(tuple(t.shape) for t in tensors), template,
                         int(qweight.shape[0]))
        inner = tuple(t.detach().reshape(-1) for t in tensors)
        return cls(inner, layout, torch.Size(qweight.shape), dtype)

    def _like(self, inner: tuple[torch.Tensor, ...], size: torch.Size | None = None,
              dtype: torch.dtype | None = None) -> ShardedQuantizedTensor:
        return ShardedQuantizedTensor(inner, self.qlayout, size if size is not None else self.shape,
                                      dtype or self.dtype)

    @property
    def is_whole(self) -> bool:
        return self.shape[0] == self.qlayout.rows and all(
            t.numel() >= n for t, n in zip(self.parts, self.qlayout.numels, strict=True)
        )

    def qweight(self) -> QuantizedWeight:
        """The quantized weight (views of the inner tensors); only for a whole (gathered) tensor."""
        if not self.is_whole:
            raise RuntimeError(
                "this is one FSDP shard of a quantized weight: it is used only after FSDP all-gathers it "
                "(inside the forward of a fully_shard module)"
            )
        lay = self.qlayout
        tensors = {n: t[:k].view(s) for n, t, k, s in zip(lay.names, self.parts, lay.numels, lay.shapes, strict=True)}
        tpl = lay.template
        return QuantizedWeight(tpl.quantizer, tpl.config, tpl.shape, tensors, tpl.meta, tpl.dtype)

    def __repr__(self) -> str:  # type: ignore[override]
        return (f"ShardedQuantizedTensor({self.qlayout.template.quantizer}, shape={tuple(self.shape)}, "
                f"inner={[tuple(t.shape) for t in self.parts]})")

    def __tensor_flatten__(self) -> tuple[list[str], tuple[Any, ...]]:
        names = [f"inner{i}" for i in range(len(self.parts))]
        for n, t in zip(names, self.parts, strict=True):
            setattr(self, n, t)
        return names, (self.qlayout, self.shape, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], meta: tuple[Any, ...], outer_size: Any,
                             outer_stride: Any) -> ShardedQuantizedTensor:
        layout, size, dtype = meta
        return ShardedQuantizedTensor(tuple(inner[f"inner{i}"] for i in range(len(inner))), layout, size, dtype)

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple[Any, ...] = (),  # type: ignore[override]
                           kwargs: dict[str, Any] | None = None) -> Any:
        handler = _OPS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"{func} is not defined on a quantized weight held for FSDP (lqmod.fsdp): it supports the ops "
                "fully_shard applies to a frozen parameter; use .qweight() to compute with it"
            )
        return handler(*args, **(kwargs or {}))

    # -- FSDP2 all-gather extension -----------------------------------------------------

    def fsdp_pre_all_gather(self, mesh: Any, outer_size: Any, outer_stride: Any, module: Any,
                            mp_policy: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
        return self.parts, None

    def fsdp_post_all_gather(self, outputs: tuple[torch.Tensor, ...], metadata: Any, param_dtype: torch.dtype, *,
                             out: torch.Tensor | None = None) -> Any:
        if out is not None:
            # FSDP gathered into the same buffers again: ``out``'s inner tensors are views of them.
            return None
        full = ShardedQuantizedTensor(tuple(outputs), self.qlayout,
                                      torch.Size((self.qlayout.rows, *self.shape[1:])), self.dtype)
        return full, tuple(outputs)


_OPS: dict[Any, Callable[..., Any]] = {}


def _op(*funcs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for f in funcs:
            _OPS[f] = fn
        return fn

    return register


def _chunks(t: ShardedQuantizedTensor, sizes: list[int]) -> list[ShardedQuantizedTensor]:
    rows = int(t.shape[0])
    if len(set(sizes)) != 1 or sum(sizes) != rows:
        raise NotImplementedError(
            f"a quantized weight of {rows} rows splits only into equal parts (got {sizes}): "
            "shard it over a number of processes that divides its rows"
        )
    k = len(sizes)
    pieces = []
    for x in t.parts:
        per = -(-x.numel() // k)
        padded = torch.cat([x, x.new_zeros(per * k - x.numel())]) if per * k != x.numel() else x
        pieces.append(padded.split(per))
    size = torch.Size((sizes[0], *t.shape[1:]))
    return [t._like(tuple(p[i] for p in pieces), size) for i in range(k)]


@_op(aten.split.Tensor)
def _split(t: ShardedQuantizedTensor, split_size: int, dim: int = 0) -> list[ShardedQuantizedTensor]:
    if dim != 0:
        raise NotImplementedError("a quantized weight splits along dim 0 only (FSDP's Shard(0))")
    rows = int(t.shape[0])
    return _chunks(t, [split_size] * (rows // split_size) + ([rows % split_size] if rows % split_size else []))


@_op(aten.split_with_sizes.default)
def _split_sizes(t: ShardedQuantizedTensor, sizes: list[int], dim: int = 0) -> list[ShardedQuantizedTensor]:
    if dim != 0:
        raise NotImplementedError("a quantized weight splits along dim 0 only (FSDP's Shard(0))")
    return _chunks(t, list(sizes))


@_op(aten.new_zeros.default)
def _new_zeros(t: ShardedQuantizedTensor, size: list[int], **_: Any) -> ShardedQuantizedTensor:
    # FSDP asks the whole weight for a zero shard (``new_zeros(chunk size)``) to copy its own into.
    rows = int(t.shape[0])
    if not size or tuple(size[1:]) != tuple(t.shape[1:]) or size[0] <= 0 or rows % size[0]:
        raise NotImplementedError(f"new_zeros({list(size)}) of a quantized weight of shape {tuple(t.shape)}")
    k = rows // size[0]
    return t._like(tuple(x.new_zeros(-(-x.numel() // k)) for x in t.parts), torch.Size(size))


@_op(aten.slice.Tensor)
def _slice(t: ShardedQuantizedTensor, dim: int = 0, start: int | None = None, end: int | None = None,
           step: int = 1) -> ShardedQuantizedTensor:
    rows = int(t.shape[dim])
    if (start or 0) != 0 or (end is not None and min(end, rows) != rows) or step != 1:
        raise NotImplementedError(f"a quantized weight cannot be sliced [{start}:{end}:{step}] along dim {dim}")
    return t._like(t.parts)


@_op(aten.view.default, aten._unsafe_view.default)
def _view(t: ShardedQuantizedTensor, size: list[int]) -> ShardedQuantizedTensor:
    shape = list(size)
    if -1 in shape:
        known = 1
        for s in shape:
            if s != -1:
                known *= s
        shape = [t.numel() // known if s == -1 else s for s in shape]
    return t._like(t.parts, torch.Size(shape))


@_op(aten.as_strided.default)
def _as_strided(t: ShardedQuantizedTensor, size: list[int], stride: list[int],
                storage_offset: int | None = None) -> ShardedQuantizedTensor:
    shape = torch.Size(size)
    if shape.numel() != t.numel() or (storage_offset or 0) != 0:
        raise NotImplementedError("as_strided of a quantized weight may only re-view the whole of it")
    return t._like(t.parts, shape)


@_op(aten.copy_.default)
def _copy(dst: ShardedQuantizedTensor, src: ShardedQuantizedTensor, non_blocking: bool = False) -> Any:
    for d, s in zip(dst.parts, src.parts, strict=True):
        d.copy_(s, non_blocking=non_blocking)
    return dst


@_op(aten.detach.default, aten.alias.default)
def _detach(t: ShardedQuantizedTensor) -> ShardedQuantizedTensor:
    return t._like(tuple(x.detach() for x in t.parts))


@_op(aten.clone.default)
def _clone(t: ShardedQuantizedTensor, **_: Any) -> ShardedQuantizedTensor:
    return t._like(tuple(x.clone() for x in t.parts))


@_op(aten.empty_like.default)
def _empty_like(t: ShardedQuantizedTensor, **_: Any) -> ShardedQuantizedTensor:
    return t._like(tuple(torch.empty_like(x) for x in t.parts))


@_op(aten._to_copy.default)
def _to_copy(t: ShardedQuantizedTensor, *, dtype: torch.dtype | None = None, device: Any = None,
             **_: Any) -> ShardedQuantizedTensor:
    # The logical dtype is the compute dtype; the stored tensors keep theirs (codes stay uint8).
    return t._like(tuple(x.to(device=device) if device is not None else x.clone() for x in t.parts), dtype=dtype)


@_op(aten.is_pinned.default)
def _is_pinned(t: ShardedQuantizedTensor, device: Any = None) -> bool:
    return all(x.is_pinned() for x in t.parts)


@_op(aten._pin_memory.default)
def _pin(t: ShardedQuantizedTensor, device: Any = None) -> ShardedQuantizedTensor:
    return t._like(tuple(x.pin_memory() for x in t.parts))


class ShardableQuantizedBase(QuantizedBase):
    """A :class:`QuantizedBase` whose tensors live in one frozen parameter FSDP2 can shard."""

    def __init__(self, qweight: QuantizedWeight) -> None:
        nn.Module.__init__(self)
        self.header = qweight.header()
        self.names = tuple(sorted(qweight.tensors))
        self._template = QuantizedWeight(
            qweight.quantizer, qweight.config, qweight.shape, {}, qweight.meta, qweight.dtype
        )
        self.packed = nn.Parameter(ShardedQuantizedTensor.from_qweight(qweight, qweight.dtype), requires_grad=False)

    def qweight(self) -> QuantizedWeight:
        packed = self.packed
        data = packed.to_local() if hasattr(packed, "to_local") else packed
        if not isinstance(data, ShardedQuantizedTensor):
            raise TypeError(f"packed quantized weight is a {type(data).__name__}, not a ShardedQuantizedTensor")
        return data.qweight()


def make_bases_shardable(model: nn.Module) -> int:
    """Give every quantized layer of ``model`` a :class:`ShardableQuantizedBase`; call before
    ``fully_shard``. Returns how many layers were converted (state-dict keys of the bases
    become ``<layer>.base.packed``: save checkpoints before converting)."""
    n = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and not isinstance(module.base, ShardableQuantizedBase):
            module.base = ShardableQuantizedBase(module.base.qweight())
            n += 1
    if not n:
        raise ValueError("model has no lqmod quantized layers to make shardable")
    return n
