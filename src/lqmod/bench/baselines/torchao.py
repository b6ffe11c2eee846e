"""torchao's NF4Tensor (QLoRA NF4 with 8-bit linear double quantization of the scales)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lqmod.bench.baselines.base import Baseline, Quantized, Unavailable, nbits


def _torchao_to_nf4() -> Any:
    # NF4Tensor moved in torchao 0.1x; try the new home first, then the old one.
    for path in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor"):
        try:
            return importlib.import_module(path).to_nf4
        except (ImportError, AttributeError):
            continue
    raise Unavailable("torchao not installed, or it has no NF4Tensor (to_nf4)")


@dataclass(frozen=True)
class TorchaoNF4(Baseline):
    """torchao's NF4Tensor (QLoRA NF4 with 8-bit linear double quantization of the scales)."""

    name: ClassVar[str] = "torchao-nf4"
    dist: ClassVar[str] = "torchao"
    blocksize: int = 64
    scaler_blocksize: int = 256

    def prepare(self) -> None:
        _torchao_to_nf4()

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        to_nf4 = _torchao_to_nf4()
        n_blocks = weight.numel() // self.blocksize
        sb, note = self.scaler_blocksize, ""
        # torchao needs the number of blocks to be a multiple of the scaler block; halve it
        # where it is not (e.g. SmolLM2's 192x576 k/v projections), and say so.
        while n_blocks % sb and sb > 1:
            sb //= 2
        if sb != self.scaler_blocksize:
            note = f"scaler_blocksize {sb} where {self.scaler_blocksize} does not divide the blocks"
        t = to_nf4(weight.float().contiguous(), self.blocksize, sb)
        bits = nbits(t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean.reshape(1))
        return Quantized(t.get_original_weight().float(), bits, note)
