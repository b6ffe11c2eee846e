"""PEFT's LoftQ initialisation (NF4 base plus a low-rank SVD correction)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lqmod.bench.baselines.base import Baseline, Quantized, Unavailable, require


@dataclass(frozen=True)
class LoftQ(Baseline):
    """PEFT's LoftQ initialisation: NF4 base Q plus a rank-r SVD correction B A of W - Q.

    ``peft.utils.loftq_utils.loftq_init`` hard-codes a CUDA/XPU compute device; without one
    the same loop runs on CPU with PEFT's own ``_low_rank_decomposition`` and the same
    bitsandbytes NF4 call (``Params4bit``: blocksize 64, no double quantization). The stored
    bits include the adapters at 16 bits, since the error measured includes them.
    """

    name: ClassVar[str] = "loftq"
    dist: ClassVar[str] = "peft"
    bits: int = 4
    rank: int = 16
    iters: int = 1

    def prepare(self) -> None:
        require("peft.utils.loftq_utils", "peft")
        require("bitsandbytes.functional", "bitsandbytes")
        if self.bits != 4:
            raise Unavailable(f"PEFT LoftQ supports NF4 (bits=4) and int8 only, not bits={self.bits}")

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        import bitsandbytes.functional as bnbf
        from peft.utils import loftq_utils

        w = weight.float()
        if torch.cuda.is_available():
            deq, lora_a, lora_b = loftq_utils.loftq_init(w, num_bits=4, reduced_rank=self.rank, num_iter=self.iters)
            deq, lora_a, lora_b = deq.float().cpu(), lora_a.float().cpu(), lora_b.float().cpu()
            note = "peft.loftq_init"
        else:
            res = w.clone()
            for i in range(self.iters):
                q, state = bnbf.quantize_4bit(
                    res.contiguous(), blocksize=64, compress_statistics=False, quant_type="nf4"
                )
                deq = bnbf.dequantize_4bit(q, state).float()
                out = loftq_utils._low_rank_decomposition(w - deq, reduced_rank=self.rank)
                lora_b, lora_a = out["L"], out["R"]
                if i + 1 < self.iters:
                    res = w - lora_b @ lora_a
            note = "peft loftq_init needs CUDA: same loop on CPU (peft SVD + bnb NF4)"
        bits = 4 * w.numel() + 32 * -(-w.numel() // 64) + 16 * self.rank * sum(w.shape)
        return Quantized(deq + lora_b @ lora_a, bits, note)
