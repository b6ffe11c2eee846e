"""The backend interface, the capabilities a kernel declares, and the choice between backends."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from lqmod.kernels.formats import LutFormat
from lqmod.types import Materialize, QuantizedWeight

__all__ = ["BackendName", "Capabilities", "KernelBackend", "LutFormatFn", "select_backend"]

LutFormatFn = Callable[[QuantizedWeight], "LutFormat | None"]
BackendName = Literal["auto", "torch", "native", "triton"]


class KernelBackend(Protocol):
    name: str

    def linear(self, x: torch.Tensor, qweight: QuantizedWeight, materialize: Materialize) -> torch.Tensor:
        """``x @ W.T`` for ``x`` of shape (..., in_features)."""
        ...

    def linear_t(self, g: torch.Tensor, qweight: QuantizedWeight, materialize: Materialize) -> torch.Tensor:
        """``g @ W`` for ``g`` of shape (..., out_features): the input gradient."""
        ...


@dataclass(frozen=True)
class Capabilities:
    """What a kernel handles, declared up front and checked before it is chosen.

    ``devices`` holds device types ("cuda") and "interpreter" for Triton's CPU interpreter.
    """

    devices: frozenset[str]
    bits: frozenset[int]
    dtypes: frozenset[torch.dtype]
    max_group_size: int | None = None
    g_idx: bool = True
    zeros: bool = True

    def unsupported(self, fmt: LutFormat, device: str, dtype: torch.dtype | None = None) -> str | None:
        """Why this kernel cannot run ``fmt`` on ``device`` with ``dtype`` inputs; None if it can."""
        if device not in self.devices:
            return f"device {device!r} not in {sorted(self.devices)}"
        if fmt.bits not in self.bits:
            return f"{fmt.bits}-bit codes not in {sorted(self.bits)}"
        if dtype is not None and dtype not in self.dtypes:
            return f"dtype {dtype} not in {sorted(str(d) for d in self.dtypes)}"
        if self.max_group_size is not None and fmt.group_size > self.max_group_size:
            return f"group_size {fmt.group_size} > {self.max_group_size}"
        if fmt.g_idx is not None and not self.g_idx:
            return "g_idx (act-order groups) unsupported"
        if fmt.zeros is not None and not self.zeros:
            return "zero offsets unsupported"
        return None


def select_backend(
    qweight: QuantizedWeight,
    device: torch.device,
    *,
    lut_format: LutFormatFn | None = None,
    backend: BackendName | None = None,
) -> KernelBackend:
    """The fastest backend that declares support for this weight's format on ``device``.

    ``lut_format`` is the quantizer's :attr:`~lqmod.types.QuantizerSpec.lut_format`; without
    it only the torch reference applies. ``backend`` (default: "auto") forces a choice;
    "auto" picks Triton on CUDA when triton imports and the format is supported; on CPU the
    compiled "native" LUT kernel (:mod:`lqmod.kernels.native`) when it builds and declares
    the format, else the torch reference, unless ``LQMOD_TRITON_INTERPRET=1`` asks for
    Triton's interpreter. An explicit "triton" or "native" that cannot run raises instead of
    falling back.
    """
    from lqmod.kernels.reference import REFERENCE

    device = torch.device(device)
    choice = backend or "auto"
    if choice not in ("auto", "torch", "native", "triton"):
        raise ValueError(f"unknown kernel backend {choice!r}; choose one of: auto, torch, native, triton")
    if choice == "native" or (choice == "auto" and device.type == "cpu" and not _env_wants_interpreter()):
        native_reason = _native_unsupported(qweight, device, lut_format)
        if native_reason is None:
            from lqmod.kernels.native.backend import NativeLutBackend

            assert lut_format is not None
            return NativeLutBackend(lut_format)
        if choice == "native":
            raise ValueError(f"the native backend cannot run {qweight.quantizer!r} weights: {native_reason}")
        return REFERENCE
    # The environment variable is a process-wide preference: weights the interpreter
    # cannot run quietly keep the reference. Only the explicit argument is strict.
    wants_triton = choice == "triton" or (choice == "auto" and (device.type == "cuda" or _env_wants_interpreter()))
    if not wants_triton:
        return REFERENCE
    reason = _triton_unsupported(qweight, device, lut_format)
    if reason is None:
        from lqmod.kernels.triton.backend import TritonLutBackend

        assert lut_format is not None
        return TritonLutBackend(lut_format)
    if choice == "triton":
        raise ValueError(f"the triton backend cannot run {qweight.quantizer!r} weights: {reason}")
    return REFERENCE


def _triton_unsupported(qweight: QuantizedWeight, device: torch.device, lut_format: LutFormatFn | None) -> str | None:
    from lqmod.kernels.triton import device_kind, triton_available

    if lut_format is None:
        return "the quantizer declares no lut_format"
    fmt = lut_format(qweight)
    if fmt is None:
        return "this weight's configuration has no LutFormat"
    if not triton_available():
        return "triton is not installed"
    from lqmod.kernels.triton.backend import TILED

    # The tiled kernel's capabilities are the backend's: what it cannot fuse, it tiles.
    return TILED.unsupported(fmt, device_kind(device))


def _native_unsupported(qweight: QuantizedWeight, device: torch.device, lut_format: LutFormatFn | None) -> str | None:
    if lut_format is None:
        return "the quantizer declares no lut_format"
    from lqmod.kernels.native import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return reason
    fmt = lut_format(qweight)
    if fmt is None:
        return "this weight's configuration has no LutFormat"
    from lqmod.kernels.native.backend import NATIVE

    return NATIVE.unsupported(fmt, device.type)


def _env_wants_interpreter() -> bool:
    return _truthy(os.environ.get("LQMOD_TRITON_INTERPRET"))


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")
