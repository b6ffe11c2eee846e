"""The ``icq`` quantizer: ``W ~ base(W - tau) + tau``, one entropy-maximising shift per block.

Stored tensors (their bytes are the storage cost, so the shifts are counted exactly):

* ``base_<name>``: every tensor of the base quantizer's weight of ``W - tau``;
* ``tau_codes``: int8 (n_blocks,), one per base LUT group (block), in [-127, 127];
* ``tau_scale``: float32 (ceil(n_blocks / tau_groupsize),), the second-level scale.

So icq costs ``8 / group + 32 / (group * tau_groupsize)`` bits per weight on top of the base:
0.127 at group 64, 0.0635 at group 128. ``meta`` keeps the base weight's meta and the mean
code entropy before and after the search (small JSON, not per-parameter data).
"""

from __future__ import annotations

import functools
import json
import math

import torch

from lqmod.quantize import QuantizationError, quantize_weight
from lqmod.types import LayerStats, QuantizedWeight
from lqmod_icq.config import NAME, ICQConfig, base_spec
from lqmod_icq.search import block_codes, search_shifts, shift_values

__all__ = [
    "BASE_PREFIX", "base_qweight", "bits_per_param", "group_size", "materialize", "options", "quantize", "shifts"
]

BASE_PREFIX = "base_"


@functools.lru_cache(maxsize=256)
def _probe_group_size(base: str, base_config_json: str, in_f: int) -> int:
    # The LUT group of a row depends on in_features only (LutFormat groups are column groups of
    # a row), so one quantized row tells it without quantizing the whole matrix.
    cfg = ICQConfig(base=base, base_config=json.loads(base_config_json))
    spec = base_spec(cfg)
    row = torch.linspace(-1.0, 1.0, in_f).unsqueeze(0)
    probe = quantize_weight(spec, row, spec.config_model.model_validate(cfg.base_config), name=f"icq base ({base})")
    codes, _ = block_codes(spec, probe)
    return int(codes.shape[1])


def group_size(cfg: ICQConfig, in_f: int) -> int:
    """The block (base LUT group) length for rows of ``in_f`` weights."""
    return _probe_group_size(cfg.base, json.dumps(cfg.base_config, sort_keys=True), in_f)


def quantize(weight: torch.Tensor, cfg: ICQConfig, stats: LayerStats | None = None) -> QuantizedWeight:
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    spec = base_spec(cfg)
    base_cfg = spec.config_model.model_validate(cfg.base_config)

    def quantize_base(dense: torch.Tensor) -> QuantizedWeight:
        return quantize_weight(spec, dense, base_cfg, None, name=f"icq base ({spec.name})")

    result = search_shifts(
        weight, quantize_base, spec, group_size(cfg, shape[1]),
        tau_range=cfg.tau_range, tau_n=cfg.tau_n, tau_groupsize=cfg.tau_groupsize,
    )  # fmt: skip
    tensors = {BASE_PREFIX + k: v for k, v in result.qweight.tensors.items()}
    tensors["tau_codes"] = result.tau_codes
    tensors["tau_scale"] = result.tau_scale
    meta = {
        "base_meta": result.qweight.meta,
        "entropy_plain": float(result.plain_entropy.mean()),
        "entropy": float(result.entropy.mean()),
        "shifted_blocks": float((result.tau_codes != 0).double().mean()),
    }
    return QuantizedWeight(NAME, cfg.model_dump(mode="json"), shape, tensors, meta, dtype=weight.dtype)


def base_qweight(qweight: QuantizedWeight) -> QuantizedWeight:
    """The base quantizer's weight (of ``W - tau``) stored inside an icq weight."""
    n = len(BASE_PREFIX)
    return QuantizedWeight(
        str(qweight.config["base"]),
        dict(qweight.config["base_config"]),
        qweight.shape,
        {k[n:]: v for k, v in qweight.tensors.items() if k.startswith(BASE_PREFIX)},
        dict(qweight.meta.get("base_meta", {})),
        torch.float32,
    )


def shifts(qweight: QuantizedWeight) -> torch.Tensor:
    """The float32 shift of every block, (n_blocks,)."""
    return shift_values(
        qweight.tensors["tau_codes"], qweight.tensors["tau_scale"], int(qweight.config["tau_groupsize"])
    )


def materialize(qweight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    base = base_qweight(qweight)
    spec = base_spec(qweight.config)
    tau = shifts(qweight)
    out_f, in_f = qweight.shape
    group = in_f * out_f // tau.numel()
    work = torch.float64 if dtype == torch.float64 else torch.float32
    dense = spec.materialize(base, work).reshape(-1, group)
    return dense.add_(tau.to(work).unsqueeze(1)).view(out_f, in_f).to(dtype)


def bits_per_param(cfg: ICQConfig, shape: tuple[int, int]) -> float:
    spec = base_spec(cfg)
    n = shape[0] * shape[1]
    # The base reports storage_bits / n; rounding back to its integer numerator keeps the total
    # one integer division, equal to QuantizedWeight.bits_per_param() bit for bit.
    base_bits = round(spec.bits_per_param(spec.config_model.model_validate(cfg.base_config), shape) * n)
    group = group_size(cfg, shape[1])
    if n % group:
        raise QuantizationError(f"icq: base groups of {group} do not tile the {shape} matrix")
    n_blocks = n // group
    return (base_bits + 8 * n_blocks + 32 * math.ceil(n_blocks / cfg.tau_groupsize)) / n


def options() -> list[ICQConfig]:
    """NF2/3/4 bases with double quantization at block 64 and 128 (icq at 128 costs what plain NF at 64 does)."""
    return [
        ICQConfig(base="nf", base_config={"bits": bits, "blocksize": bs, "double_quant": True})
        for bits in (2, 3, 4)
        for bs in (64, 128)
    ]
