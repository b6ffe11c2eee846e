"""The OPTQ quantizer: quantize, materialize and the exact storage cost.

Stored tensors (their bytes *are* the storage cost):

* ``codes``:  the ``bits``-bit codes of all weights, row-major in the *original* column order,
  packed with :func:`lqmod.packing.pack_codes` (what :class:`~lqmod.kernels.formats.LutFormat`
  reads, so the Triton kernels need no repacking);
* ``scales``: (out_features, n_groups) float16; with ``scale_bits=8`` instead ``scale_codes``
  (out_features, n_groups) uint8 and ``scale_ref`` (1,) float32, the bytes and the reference of
  :mod:`lqmod_optq.scale_codes` (each byte's scale is a float16, so what follows holds alike);
* ``zeros``:  asymmetric only, the ``bits``-bit integer zero points of ``scales``' groups, packed
  alike (symmetric grids use the constant ``2**(bits-1)``);
* ``g_idx``:  act-order with dynamic groups only, int32 (in_features,): the group of each column.

The dense weight is ``(code - zero[o, g]) * scale[o, g]`` with ``g = g_idx[i]`` (or ``i //
group_size``), computed in float32: a float16 scale times an integer below 2**9 is exact there.
"""

from __future__ import annotations

from functools import cache

import torch

from lqmod.packing import decode_codes, pack_codes, packed_nbytes, unpack_codes
from lqmod.types import LayerStats, QuantizedWeight
from lqmod_optq import scale_codes
from lqmod_optq.algorithm import normalised_hessian, optq
from lqmod_optq.config import NAME, OPTQConfig, group_size_for, n_groups_for, stores_g_idx

__all__ = [
    "bits_per_param", "column_groups", "group_scales", "materialize", "quantize", "storage_bits", "zero_points",
]  # fmt: skip


def quantize(
    weight: torch.Tensor,
    cfg: OPTQConfig,
    stats: LayerStats | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> QuantizedWeight:
    """OPTQ-quantize ``weight`` (out, in) with ``stats.hessian``; ``compute_dtype`` is for tests."""
    out_f, in_f = weight.shape
    group = group_size_for(cfg, in_f)
    h = normalised_hessian(None if stats is None else stats.hessian, 0 if stats is None else stats.n_tokens, in_f)
    ref = scale_codes.reference_scale(weight, cfg.bits, group, cfg.sym) if cfg.scale_bits == 8 else None
    res = optq(
        weight.to(h.device),
        h,
        bits=cfg.bits,
        group_size=group,
        desc_act=cfg.desc_act,
        static_groups=cfg.static_groups,
        sym=cfg.sym,
        damp=cfg.damp,
        block_size=cfg.block_size,
        group_fit=cfg.group_fit,
        scale_ref=ref,
        dtype=compute_dtype,
    )
    device = weight.device
    tensors = {"codes": pack_codes(res.codes, cfg.bits).to(device)}
    if ref is None:
        tensors["scales"] = res.scales.contiguous().to(device)
    else:
        tensors["scale_codes"] = scale_codes.lookup(res.scales, ref).contiguous().to(device)
        tensors["scale_ref"] = torch.tensor([ref], dtype=torch.float32, device=device)
    if not cfg.sym:
        tensors["zeros"] = pack_codes(res.zeros, cfg.bits).to(device)
    if stores_g_idx(cfg, in_f):
        tensors["g_idx"] = res.g_idx.to(torch.int32).to(device)
    meta = dict(res.meta)
    if stats is not None:
        meta["n_tokens"] = int(stats.n_tokens)
    return QuantizedWeight(NAME, cfg.model_dump(), (out_f, in_f), tensors, meta=meta, dtype=weight.dtype)


def column_groups(qweight: QuantizedWeight) -> torch.Tensor:
    """int64 (in,): the group of every input column."""
    cfg = qweight.config
    in_f = qweight.shape[1]
    if "g_idx" in qweight.tensors:
        return qweight.tensors["g_idx"].long()
    group = in_f if int(cfg["group_size"]) == -1 else int(cfg["group_size"])
    return torch.arange(in_f, device=qweight.device) // group


def group_scales(qweight: QuantizedWeight) -> torch.Tensor:
    """float16 (out, n_groups): every group's scale, stored or decoded from its byte."""
    t = qweight.tensors
    if "scale_codes" not in t:
        return t["scales"]
    return scale_codes.table(t["scale_ref"], t["scale_codes"].device)[t["scale_codes"].long()]


def zero_points(qweight: QuantizedWeight) -> torch.Tensor:
    """int64 (out, n_groups) integer zero points (the constant 2**(bits-1) when symmetric)."""
    bits = int(qweight.config["bits"])
    t = qweight.tensors
    scales = t["scale_codes"] if "scale_codes" in t else t["scales"]
    if qweight.config["sym"]:
        return torch.full(scales.shape, 2 ** (bits - 1), dtype=torch.int64, device=scales.device)
    return unpack_codes(qweight.tensors["zeros"], bits, scales.numel()).view(scales.shape)


def materialize(qweight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    # Reads the config dict directly: this runs in every forward and backward, and the
    # config was validated when the weight was quantized.
    out_f, in_f = qweight.shape
    bits = int(qweight.config["bits"])
    work = torch.float64 if dtype == torch.float64 else torch.float32
    t = qweight.tensors
    # The codes come out as floats through a byte table (lqmod.packing.decode_codes): q - z
    # of small integers is exact in float, so this is the integer (q - z) * s bit for bit.
    codes = decode_codes(t["codes"], bits, out_f * in_f, _levels(bits, work, t["codes"].device))
    zeros = zero_points(qweight).to(work)
    scales = group_scales(qweight).to(work)
    if "g_idx" in t:  # act-order: column i's group is g_idx[i]
        # index_select along the columns, in place on the decoded codes: one (out, in)
        # temporary at a time, and several times faster than advanced indexing.
        groups = t["g_idx"]
        dense = codes.view(out_f, in_f).sub_(torch.index_select(zeros, 1, groups))
        dense.mul_(torch.index_select(scales, 1, groups))
    else:  # consecutive groups: broadcast one scale over each, no gathers
        n_groups = scales.shape[1]
        grouped = codes.view(out_f, n_groups, -1)
        dense = (grouped - zeros.unsqueeze(-1)).mul_(scales.unsqueeze(-1)).view(out_f, in_f)
    return dense.to(dtype)


@cache
def _levels(bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.arange(2**bits, dtype=dtype, device=device)


def storage_bits(cfg: OPTQConfig, shape: tuple[int, int]) -> int:
    """Bits :func:`quantize` stores for a weight of ``shape`` (raises if the group size does not fit)."""
    out_f, in_f = shape
    groups = out_f * n_groups_for(cfg, in_f)
    bits = packed_nbytes(out_f * in_f, cfg.bits) * 8 + groups * cfg.scale_bits
    if cfg.scale_bits == 8:
        bits += 32  # the float32 reference
    if not cfg.sym:
        bits += packed_nbytes(groups, cfg.bits) * 8
    if stores_g_idx(cfg, in_f):
        bits += in_f * 32
    return bits


def bits_per_param(cfg: OPTQConfig, shape: tuple[int, int]) -> float:
    # Same integer numerator and denominator as QuantizedWeight.bits_per_param(): equal floats.
    return storage_bits(cfg, shape) / (shape[0] * shape[1])
