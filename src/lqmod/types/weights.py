"""A quantized matrix (``QuantizedWeight``), the calibration statistics of a layer, packed sizes."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

JSONValue = Any  # a value json.dumps accepts
_JSON_KIND: dict[Any, str] = {str: "string", dict: "object", (list, tuple): "array"}


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input, all optional.

    ``hessian`` is X^T X summed over calibration tokens (in_features x in_features, float64),
    ``n_tokens`` how many tokens it summed, ``fisher`` a diagonal Fisher estimate shaped like
    the weight, ``act_absmean`` the mean |x| per input feature.
    """

    hessian: torch.Tensor | None = None
    n_tokens: int = 0
    fisher: torch.Tensor | None = None
    act_absmean: torch.Tensor | None = None


@dataclass
class QuantizedWeight:
    """One quantized matrix: the tensors a quantizer stored, and the JSON metadata to read them.

    ``shape`` is the dense (out_features, in_features). ``tensors`` hold everything needed to
    materialize the weight (codes, scales, codebooks ...); their byte count *is* the storage
    cost, so a quantizer must store codes packed. ``meta`` holds small JSON values (not
    counted: they are per-matrix constants, not per-parameter data).
    """

    quantizer: str
    config: dict[str, JSONValue]
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor]
    meta: dict[str, JSONValue] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def storage_bits(self) -> int:
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors.values())

    def bits_per_param(self) -> float:
        return self.storage_bits() / self.numel

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            self.quantizer,
            dict(self.config),
            self.shape,
            {k: v.to(device) for k, v in self.tensors.items()},
            dict(self.meta),
            self.dtype,
        )

    def header(self) -> dict[str, JSONValue]:
        """Everything but the tensors, as JSON-able data (stored in checkpoints)."""
        return {
            "quantizer": self.quantizer,
            "config": self.config,
            "shape": list(self.shape),
            "meta": self.meta,
            "dtype": str(self.dtype).removeprefix("torch."),
            "tensors": sorted(self.tensors),
        }

    @classmethod
    def from_header(
        cls, header: Mapping[str, JSONValue], tensors: Mapping[str, torch.Tensor]
    ) -> QuantizedWeight:
        """Rebuild from :meth:`header` data and the tensors; malformed data is a ``ValueError``
        saying which field is wrong and what it must be (headers come from files users edit)."""
        if not isinstance(header, Mapping):
            raise ValueError(f"quantized weight header must be a JSON object, got {type(header).__name__}")
        kinds: tuple[tuple[str, type | tuple[type, ...]], ...] = (
            ("quantizer", str), ("config", dict), ("shape", (list, tuple)), ("tensors", (list, tuple))
        )
        for key, kind in kinds:
            if key not in header:
                raise ValueError(f"quantized weight header lacks {key!r}")
            if not isinstance(header[key], kind):
                raise ValueError(
                    f"quantized weight header field {key!r} must be a JSON {_JSON_KIND[kind]}, got {header[key]!r}"
                )
        names = header["tensors"]
        if not all(isinstance(k, str) for k in names):
            raise ValueError(f"quantized weight header field 'tensors' must list tensor names, got {names!r}")
        missing = set(names) - set(tensors)
        if missing:
            raise ValueError(
                f"quantized weight ({header['quantizer']}) lacks tensors {sorted(missing)}"
            )
        # A default, so an unknown name ("float99") is the ValueError below, not an AttributeError.
        dtype = getattr(torch, str(header.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {header.get('dtype')!r} in quantized weight header")
        shape_data = header["shape"]
        # bool is an int in Python; a shape of [true, 4] is as wrong as ["a", 4].
        if len(shape_data) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                           for s in shape_data):
            raise ValueError(
                f"quantized weight shape must be 2-D, two positive integers [out, in], got {shape_data!r}"
            )
        meta = header.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"quantized weight header field 'meta' must be a JSON object, got {meta!r}")
        return cls(
            quantizer=header["quantizer"],
            config=dict(header["config"]),
            shape=(int(shape_data[0]), int(shape_data[1])),
            tensors={k: tensors[k] for k in names},
            meta=dict(meta),
            dtype=dtype,
        )

    def to_safetensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and string metadata for :func:`safetensors.torch.save_file`."""
        return (
            {k: v.contiguous() for k, v in self.tensors.items()},
            {"lqmod.qweight": json.dumps(self.header(), sort_keys=True)},
        )

    @classmethod
    def from_safetensors(
        cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
    ) -> QuantizedWeight:
        if "lqmod.qweight" not in metadata:
            raise ValueError("safetensors file has no 'lqmod.qweight' metadata: not a QuantizedWeight")
        return cls.from_header(json.loads(metadata["lqmod.qweight"]), tensors)


def packed_nbytes(n_codes: int, bits: int) -> int:
    """Bytes needed to store ``n_codes`` codes of ``bits`` bits packed back to back."""
    return math.ceil(n_codes * bits / 8)
