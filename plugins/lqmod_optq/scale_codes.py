"""One byte per group scale (``scale_bits=8``): OPTQ's counterpart of NF's double quantization.

A float16 scale per group of 64 costs 0.25 bits/param, which is why OPTQ-3 at groups of 64
(3.297 bits with zero points) cannot be compared with NF3 at 3.127 bits. Here a scale is a
byte ``c`` on a logarithmic grid below a per-matrix float32 reference ``r``:

    scale(c) = float16(r * 2 ** (-c / 16)),  c = 0 .. 255

16 levels per octave (at most 2.2% from any scale in range) over 16 octaves. The grid is fixed
*before* OPTQ's sweep, from the original weight (twice its largest min-max group scale, so the
error feedback can grow a group's range without clipping), so each group's byte is chosen when
the sweep reaches it and the codes are rounded against exactly the scale materialize will use.
Every level is a float16, so ``(q - z) * s`` stays exact in float32 and the kernels, the
reference path and the GPTQ export (which stores float16 scales) agree bit for bit.
"""

from __future__ import annotations

from functools import lru_cache

import torch

__all__ = ["LEVELS", "STEPS_PER_OCTAVE", "encode", "lookup", "reference_scale", "table"]

LEVELS = 256
STEPS_PER_OCTAVE = 16
# Room above the largest min-max scale of the original weight: OPTQ's error feedback moves
# later columns, and a group whose range outgrew the grid would be clipped at its extremes.
HEADROOM = 2.0


def reference_scale(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> float:
    """``r``: HEADROOM times the largest min-max scale over the groups of ``weight`` (out, in),
    rounded to float32 (its storage type); 1.0 for an all-zero weight."""
    out_f, in_f = weight.shape
    w = weight.detach().to(torch.float64).reshape(out_f, in_f // group_size, group_size)
    lo = w.amin(-1).clamp(max=0)
    hi = w.amax(-1).clamp(min=0)
    span = 2 * torch.maximum(lo.abs(), hi) if sym else hi - lo
    largest = float(span.max()) / (2**bits - 1)
    ref = HEADROOM * largest if largest > 0 else 1.0
    return float(torch.tensor(ref, dtype=torch.float32))


@lru_cache(maxsize=256)
def _table_cpu(ref: float) -> torch.Tensor:
    # float64 on the CPU whatever the device, so every device derives identical float16 levels.
    steps = torch.arange(LEVELS, dtype=torch.float64) / STEPS_PER_OCTAVE
    return (ref * torch.exp2(-steps)).to(torch.float16)


def table(ref: float | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """(256,) float16: the scale of every byte, largest first."""
    value = float(ref.reshape(-1)[0]) if isinstance(ref, torch.Tensor) else float(ref)
    levels = _table_cpu(value)
    return levels if device is None else levels.to(device)


def encode(scale: torch.Tensor, ref: float) -> torch.Tensor:
    """The byte of the level nearest (in log scale) to each positive ``scale``; uint8, same shape.

    Scales above ``ref`` take byte 0 and those below the lowest level byte 255 (a zero scale
    too: its group is all zeros, which any scale reproduces)."""
    s = scale.to(torch.float64).clamp(min=torch.finfo(torch.float64).tiny)
    c = torch.round(STEPS_PER_OCTAVE * torch.log2(ref / s))
    return c.clamp(0, LEVELS - 1).to(torch.uint8)


def lookup(scales: torch.Tensor, ref: float) -> torch.Tensor:
    """The bytes of scales that are levels of ``table(ref)`` (what the sweep chose); uint8.

    Levels that coincide in float16 (deep subnormals) decode to the same scale, so whichever
    byte is found is exact."""
    ascending = table(ref, scales.device).flip(0)
    idx = torch.searchsorted(ascending, scales.to(torch.float16).contiguous())
    idx = idx.clamp(max=LEVELS - 1)
    if not bool((ascending[idx] == scales.to(torch.float16)).all()):
        raise ValueError("a scale is not a level of the byte grid; quantize with the grid's own scales")
    return (LEVELS - 1 - idx).to(torch.uint8)
