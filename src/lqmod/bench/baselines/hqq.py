"""Half-Quadratic Quantization from the ``hqq`` package."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lqmod.bench.baselines.base import Baseline, Quantized, nbits, require


@dataclass(frozen=True)
class HQQ(Baseline):
    """Half-Quadratic Quantization (hqq's ``Quantizer``), affine per group, zero and scale
    optimised by its proximal solver; scale and zero kept in float16 as HQQ stores them."""

    name: ClassVar[str] = "hqq"
    dist: ClassVar[str] = "hqq"
    bits: int = 4
    group_size: int = 64

    def prepare(self) -> None:
        require("hqq.core.quantize", "hqq")

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        from hqq.core.quantize import Quantizer

        w_q, meta = Quantizer.quantize(
            weight.float().contiguous(),
            nbits=self.bits,
            channel_wise=True,
            group_size=self.group_size,
            optimize=True,
            round_zero=False,
            axis=1,
            bitpack=True,
            compute_dtype=torch.float32,
            device="cpu" if weight.device.type == "cpu" else str(weight.device),
        )
        # On CPU HQQ returns float32 scale/zero; its GPU path keeps them in the fp16 compute
        # dtype. Round them to fp16 so the error matches the 16 bits counted.
        meta = dict(meta, scale=meta["scale"].half().float(), zero=meta["zero"].half().float())
        deq = Quantizer.dequantize(w_q, meta).float().reshape(weight.shape)
        return Quantized(deq, nbits(w_q) + 16 * (meta["scale"].numel() + meta["zero"].numel()))
