"""Weight formats the generic kernels understand, described as plain data.

A quantizer whose ``materialize`` is "look the code up in a small table, then scale (and
shift) per group" describes its weight as a :class:`LutFormat`; one kernel family then
serves NF-k, int-k with zero points, GPTQ groups with act-order and other block-wise
formats alike. This module imports only torch so that :mod:`lqmod.types` can name it
without an import cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["LUT_BITS", "LutFormat"]

# What the bit stream of lqmod.packing can hold; the kernels' own limits are declared
# separately (lqmod.kernels.base.Capabilities).
LUT_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


@dataclass(frozen=True, eq=False)
class LutFormat:
    """A (out, in) weight as codes -> lookup table -> per-group scale and offset.

    The dense weight is, for every row ``o`` and column ``i``::

        g    = g_idx[i]            if g_idx is not None else i // group_size
        w[o, i] = table[code(o, i)] * scales[o, g] + (zeros[o, g] if zeros is not None else 0)

    computed in float32 and only then cast to the compute dtype. ``code(o, i)`` is entry
    ``o * in + i`` of the row-major code stream in ``codes``: uint8, packed MSB-first back
    to back exactly as :func:`lqmod.packing.pack_codes` writes it (for 3 bits codes cross
    byte boundaries, rows need not start on a byte).

    ``zeros`` is an *additive* offset in weight units, not an integer zero point: a GPTQ
    ``w = (q - z) * s`` is ``table = arange(2**bits)``, ``scales = s``, ``zeros = -z * s``.
    Without ``g_idx`` there are ``ceil(in / group_size)`` groups of consecutive columns;
    with it (GPTQ act-order) column ``i`` belongs to group ``g_idx[i]`` and ``group_size``
    is informational. ``scales``/``zeros`` are float32 (out, n_groups), ``table`` float32
    with ``2**bits`` entries, ``g_idx`` int32 (in,). All tensors must share one device.
    """

    shape: tuple[int, int]
    bits: int
    codes: torch.Tensor
    table: torch.Tensor
    scales: torch.Tensor
    group_size: int
    zeros: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # Only metadata checks: this runs in every forward, and a value check (g_idx range)
        # would force a device sync. check_values() does those, once, where it is cheap.
        out_f, in_f = self.shape
        if self.bits not in LUT_BITS:
            raise ValueError(f"LutFormat bits must be one of {LUT_BITS}, got {self.bits}")
        if out_f <= 0 or in_f <= 0 or self.group_size <= 0:
            raise ValueError(f"LutFormat needs positive shape and group_size, got {self.shape}, {self.group_size}")
        _expect(self.codes, "codes", torch.uint8, None)
        need = math.ceil(out_f * in_f * self.bits / 8)
        if self.codes.numel() < need:
            raise ValueError(f"codes hold {self.codes.numel()} bytes, {self.shape} at {self.bits} bits needs {need}")
        _expect(self.table, "table", torch.float32, (2**self.bits,))
        n_groups = self.scales.shape[-1] if self.scales.dim() == 2 else -1
        if self.g_idx is None and n_groups != math.ceil(in_f / self.group_size):
            raise ValueError(
                f"scales {tuple(self.scales.shape)} do not fit shape {self.shape} with group_size "
                f"{self.group_size}: expected ({out_f}, {math.ceil(in_f / self.group_size)})"
            )
        _expect(self.scales, "scales", torch.float32, (out_f, n_groups))
        if self.zeros is not None:
            _expect(self.zeros, "zeros", torch.float32, (out_f, n_groups))
        if self.g_idx is not None:
            _expect(self.g_idx, "g_idx", torch.int32, (in_f,))
        devices = {t.device for t in self._tensors()}
        if len(devices) > 1:
            raise ValueError(f"LutFormat tensors are on several devices: {sorted(map(str, devices))}")

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def nbytes(self) -> int:
        """Bytes a kernel must read to rebuild the weight: the roofline's numerator."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def check_values(self) -> None:
        """The data-dependent checks left out of construction (they sync a GPU)."""
        if self.g_idx is not None:
            lo, hi = int(self.g_idx.min()), int(self.g_idx.max())
            if lo < 0 or hi >= self.n_groups:
                raise ValueError(f"g_idx spans [{lo}, {hi}], scales have {self.n_groups} groups")

    def to(self, device: torch.device | str) -> LutFormat:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return LutFormat(
            self.shape,
            self.bits,
            self.codes.to(device),
            self.table.to(device),
            self.scales.to(device),
            self.group_size,
            move(self.zeros),
            move(self.g_idx),
        )

    def _tensors(self) -> list[torch.Tensor]:
        maybe = (self.codes, self.table, self.scales, self.zeros, self.g_idx)
        return [t for t in maybe if t is not None]


def _expect(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...] | None) -> None:
    if t.dtype != dtype:
        raise ValueError(f"LutFormat.{name} must be {dtype}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"LutFormat.{name} must have shape {shape}, got {tuple(t.shape)}")
