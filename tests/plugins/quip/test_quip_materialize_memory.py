"""QuIP#-like materialize allocates no per-call intermediate larger than its output.

Every tensor a torch op creates during one call is tracked (a dispatch mode, with a
finalizer per tensor: a storage counts until its last tensor dies); inputs, views and
``out=`` results are not new memory. The cached codebooks are built before the call.
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lqmod
from lqmod.packing import pack_codes
from lqmod.types import QuantizedWeight


class LiveBytes(TorchDispatchMode):
    """Peak bytes of storages created by torch ops and still referenced, and the largest one."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.current = self.peak = self.largest = 0

    def _drop(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            self.current -= self.size.pop(ptr)
            del self.refs[ptr]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in inputs and ptr not in self.refs:  # a view of (or a write into) older memory
                continue
            if ptr not in self.refs:
                self.refs[ptr], self.size[ptr] = 0, storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                self.largest = max(self.largest, storage.nbytes())
            self.refs[ptr] += 1
            weakref.finalize(t, self._drop, ptr)
        return out


def random_quip(shape: tuple[int, int], bits: int, seed: int) -> tuple[lqmod.QuantizerSpec, QuantizedWeight]:
    spec = lqmod.get_registry().quantizer("quip")
    cfg = spec.config_model.model_validate({"bits": bits}).model_dump()
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    t = {
        "codes": torch.randint(-(2**15), 2**15, (2 if bits == 4 else 1, m, n // 8), generator=gen).to(torch.int16),
        "signs": pack_codes(torch.randint(0, 2, (m + n,), generator=gen), 1),
        "scales": torch.tensor([0.02, 0.006][: 1 if bits == 2 else 2]),
    }
    if bits == 3:
        t["resid_codes"] = torch.randint(0, 256, (m, n // 8), generator=gen).to(torch.uint8)
    return spec, QuantizedWeight("quip", cfg, shape, t, {}, torch.float32)


# Sylvester-only orders, a Paley factor on one side (384 = 12 * 32, 640 = 20 * 32), on both.
@pytest.mark.parametrize("shape", [(256, 512), (384, 512), (512, 640), (384, 640)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_no_intermediate_larger_than_the_output(shape: tuple[int, int], bits: int) -> None:
    spec, qw = random_quip(shape, bits, seed=bits)
    expected = spec.materialize(qw, torch.float32)  # builds the cached codebooks and transforms
    tracker = LiveBytes()
    with tracker:
        got = spec.materialize(qw, torch.float32)
    assert torch.equal(got, expected)
    out_bytes = got.numel() * got.element_size()
    assert tracker.largest <= out_bytes, (tracker.largest, out_bytes)
    # The output, the butterflies' shared half-size buffer (or, with a Paley factor, its
    # matmul's output-sized result), and small code/sign temporaries.
    sylvester = all(d & (d - 1) == 0 for d in shape)
    bound = (1.5 if sylvester else 2.0) * out_bytes + 0.15 * out_bytes
    assert tracker.peak <= bound, (tracker.peak / out_bytes, shape, bits)
