"""bitsandbytes NF4 / FP4 (``quantize_4bit`` / ``dequantize_4bit``, CPU since 0.45)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lqmod.bench.baselines.base import Baseline, Quantized, nbits, require


def _check_dequant(q: torch.Tensor, state: Any, deq: torch.Tensor, shape: torch.Size, blocksize: int) -> None:
    """Compare bnb's dequantization with its own format, code[c] * absmax[block].

    bitsandbytes 0.50.2's CPU ``dequantize_4bit`` returns wrong values when blocks straddle
    rows (``in_features % blocksize != 0``, e.g. SmolLM2's 576-wide rows at blocksize 128)
    although the codes and absmax it stored are right; such a row must fail, not be
    reported as bitsandbytes' accuracy.
    """
    import bitsandbytes.functional as bnbf

    from lqmod.packing import unpack_codes

    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    codes = unpack_codes(q.reshape(-1), 4, deq.numel())  # high nibble first, as bnb packs
    ref = (state.code.float()[codes.long()].view(-1, blocksize) * absmax.float().unsqueeze(1)).view(shape)
    bad = ~torch.isclose(deq, ref, rtol=1e-5, atol=1e-6)
    if bool(bad.any()):
        raise ValueError(
            f"bitsandbytes dequantize_4bit disagrees with its own codes x absmax on {float(bad.float().mean()):.0%} "
            f"of the values (shape {tuple(shape)}, blocksize {blocksize}, device {deq.device.type}); "
            "a bitsandbytes bug, so no result is reported"
        )


@dataclass(frozen=True)
class BnbNF4(Baseline):
    """bitsandbytes ``quantize_4bit``/``dequantize_4bit`` (CPU works since 0.45)."""

    name: ClassVar[str] = "bnb-nf4"
    dist: ClassVar[str] = "bitsandbytes"
    blocksize: int = 64
    double_quant: bool = False
    quant_type: ClassVar[str] = "nf4"

    def prepare(self) -> None:
        require("bitsandbytes.functional", "bitsandbytes")

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        import bitsandbytes.functional as bnbf

        q, state = bnbf.quantize_4bit(
            weight.float().contiguous(),
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
        )
        deq = bnbf.dequantize_4bit(q, state).float()
        _check_dequant(q, state, deq, weight.shape, self.blocksize)
        bits = nbits(q, state.absmax)
        if state.nested:  # 8-bit absmax codes + their float32 scales + the mean offset
            bits += nbits(state.state2.absmax, state.offset.reshape(1))
        return Quantized(deq, bits)


@dataclass(frozen=True)
class BnbFP4(BnbNF4):
    name: ClassVar[str] = "bnb-fp4"
    quant_type: ClassVar[str] = "fp4"
