"""One OPTQ weight <-> the GPTQ packed tensors of AutoGPTQ / GPTQModel checkpoints.

The GPTQ layout of a (out, in) layer with ``G`` groups and ``b``-bit codes:

* ``qweight`` int32 (ceil(in * b / 32), out): for every output column, the codes along the
  input dimension as one little-endian bit stream, least-significant bits first, cut into
  32-bit words. For b = 2/4/8 a word holds 32/b whole codes; for b = 3 the stream runs
  across word boundaries (32 codes fill 3 words, the 11th and 22nd codes straddle them),
  which is AutoGPTQ's "10-1-10-1-10" pattern;
* ``qzeros`` int32 (G, ceil(out * b / 32)): the integer zero points, packed the same way
  along the output dimension;
* ``scales`` float16 (G, out);
* ``g_idx`` int32 (in,): the group of every input column.

The weight is ``scales[g_idx[i], o] * (code[i, o] - zero[g_idx[i], o])``. Checkpoints come
in two zero-point conventions: ``gptq`` (v1, what AutoGPTQ wrote and GPTQModel still writes
by default) stores ``zero - 1``; ``gptq_v2`` stores ``zero``. GPTQModel converts v2 -> v1 by
subtracting the constant 0x..0101 (one per field) from each 32-bit word for b = 2/4/8, and
field by field modulo 2**b for b = 3; :func:`to_gptq` / :func:`from_gptq` do the same, so
both directions are exact inverses and agree with GPTQModel. (A zero point of 0 is not
representable in v1 for readers that add 1 per field without carry, such as AutoGPTQ's
kernels; :func:`to_gptq` warns when it writes one.)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from lqmod.packing import pack_codes, unpack_codes
from lqmod.quantize import QuantizationError
from lqmod.types import QuantizedWeight
from lqmod_optq.config import NAME, OPTQConfig, stores_g_idx
from lqmod_optq.quantizer import column_groups, group_scales, zero_points

__all__ = ["CHECKPOINT_FORMATS", "GPTQ_BITS", "from_gptq", "pack_int32", "to_gptq", "unpack_int32"]

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
GPTQ_BITS = (2, 3, 4, 8)
_MASK32 = (1 << 32) - 1


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (n, m), integers in [0, 2**bits), along dim 0 into int32 (ceil(n*bits/32), m).

    Code ``i`` of a column occupies stream bits ``[i*bits, (i+1)*bits)``, stream bit ``p``
    being bit ``p % 32`` of word ``p // 32``.
    """
    n, m = codes.shape
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to be packed in {bits} bits")
    c = codes.to(torch.int64)
    n_words = -(-n * bits // 32)
    start = torch.arange(n, device=c.device) * bits
    word, offset = start // 32, start % 32
    words = torch.zeros(n_words + 1, m, dtype=torch.int64, device=c.device)
    # Fields are disjoint, so adding them is OR-ing them.
    words.index_add_(0, word, (c << offset.unsqueeze(1)) & _MASK32)
    spill = offset + bits > 32
    if bool(spill.any()):
        words.index_add_(0, word[spill] + 1, c[spill] >> (32 - offset[spill]).unsqueeze(1))
    return _to_int32(words[:n_words])


def unpack_int32(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: the first ``n`` codes of every column, int64 (n, m)."""
    if words.shape[0] * 32 < n * bits:
        raise ValueError(f"{words.shape[0]} int32 rows cannot hold {n} codes of {bits} bits")
    w = torch.cat([words.to(torch.int64) & _MASK32, words.new_zeros(1, words.shape[1], dtype=torch.int64)])
    start = torch.arange(n, device=words.device) * bits
    word, offset = start // 32, (start % 32).unsqueeze(1)
    low = w[word] >> offset
    high = w[word + 1] << (32 - offset)  # bits spilled into the next word (shifted out when none)
    return (low | high) & ((1 << bits) - 1)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    # Two's complement view of unsigned 32-bit values held in int64.
    x = x & _MASK32
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def _v1_shift(qzeros: torch.Tensor, bits: int, out_f: int, delta: int) -> torch.Tensor:
    """Add ``delta`` (+1: v1 -> v2, -1: v2 -> v1) to every zero-point field, as GPTQModel does."""
    if bits == 3:
        fields = unpack_int32(qzeros.T, bits, out_f)
        return pack_int32((fields + delta) & 0b111, bits).T.contiguous()
    ones = sum(1 << s for s in range(0, 32, bits))  # 0x55555555, 0x11111111, 0x01010101
    return _to_int32(qzeros.to(torch.int64) + delta * ones)


def _check_bits(bits: int) -> None:
    if bits not in GPTQ_BITS:
        raise QuantizationError(f"GPTQ checkpoints hold {GPTQ_BITS}-bit codes, not {bits}")


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise QuantizationError(
            f"unknown GPTQ checkpoint format {checkpoint_format!r}; supported: {', '.join(CHECKPOINT_FORMATS)} "
            "(the planar 'gptq_p' layout and AWQ/Marlin repacks are not)"
        )


def to_gptq(qweight: QuantizedWeight, *, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """The GPTQ tensors (qweight, qzeros, scales, g_idx) of an optq weight, all on the CPU."""
    if qweight.quantizer != NAME:
        raise QuantizationError(f"only {NAME!r} weights have a GPTQ form, not {qweight.quantizer!r}")
    _check_format(checkpoint_format)
    bits = int(qweight.config["bits"])
    _check_bits(bits)
    out_f, in_f = qweight.shape
    if bits == 3 and (in_f % 32 or out_f % 32):
        raise QuantizationError(
            f"GPTQ's 3-bit layout packs 32 codes into 3 words: in_features ({in_f}) and out_features "
            f"({out_f}) must be multiples of 32"
        )
    t = {k: v.cpu() for k, v in qweight.tensors.items()}
    codes = unpack_codes(t["codes"], bits, out_f * in_f).view(out_f, in_f)
    zeros = zero_points(qweight.to("cpu"))  # (out, G)
    qzeros = pack_int32(zeros, bits).T.contiguous()  # packed along the output dimension
    if checkpoint_format == "gptq":
        if bool((zeros == 0).any()):
            warnings.warn(
                "writing zero point 0 in the GPTQ v1 format: GPTQModel reads it back exactly, AutoGPTQ-style "
                "readers (which add 1 per field) do not; write checkpoint_format='gptq_v2' for those",
                UserWarning,
                stacklevel=2,
            )
        qzeros = _v1_shift(qzeros, bits, out_f, -1)
    return {
        "qweight": pack_int32(codes.T, bits),
        "qzeros": qzeros,
        # Byte scales (scale_bits=8) decode to float16 levels: GPTQ's float16 scales hold them exactly.
        "scales": group_scales(qweight.to("cpu")).T.contiguous(),
        "g_idx": column_groups(qweight.to("cpu")).to(torch.int32),
    }


def from_gptq(
    tensors: Mapping[str, torch.Tensor],
    *,
    bits: int,
    group_size: int,
    sym: bool,
    checkpoint_format: str = "gptq",
    config: OPTQConfig | Mapping[str, Any] | None = None,
    name: str = "weight",
) -> QuantizedWeight:
    """An optq QuantizedWeight from GPTQ tensors (exact: no value is recomputed).

    ``bits``/``group_size``/``sym`` come from the checkpoint's quantize_config. ``config``, when
    given (lqmod writes it into the checkpoint), supplies the fields GPTQ does not record
    (damp, block_size, desc_act, static_groups); bits, group size and symmetry always come from
    the tensors. A ``g_idx`` other than ``i // group_size`` makes the weight act-order with
    dynamic groups (g_idx stored); ``sym=True`` needs every zero point to be ``2**(bits-1)``.
    """
    _check_bits(bits)
    _check_format(checkpoint_format)
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in tensors]
    if missing:
        raise QuantizationError(f"{name}: GPTQ tensors {missing} are missing (found {sorted(tensors)})")
    qw, qz, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    for key, t in (("qweight", qw), ("qzeros", qz)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise QuantizationError(f"{name}.{key}: expected a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    if scales.dim() != 2 or not scales.is_floating_point():
        raise QuantizationError(f"{name}.scales: expected 2-D float16, got {scales.dtype} {tuple(scales.shape)}")
    n_groups, out_f = scales.shape
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        in_f = qw.shape[0] * 32 // bits
        gs = in_f if group_size == -1 else group_size
        g_idx = torch.arange(in_f) // gs
    in_f = int(g_idx.numel())
    if in_f == 0 or qw.shape != (-(-in_f * bits // 32), out_f):
        raise QuantizationError(
            f"{name}.qweight has shape {tuple(qw.shape)}; {in_f} inputs x {out_f} outputs at {bits} bits "
            f"need ({-(-in_f * bits // 32)}, {out_f})"
        )
    if qz.shape != (n_groups, -(-out_f * bits // 32)):
        raise QuantizationError(
            f"{name}.qzeros has shape {tuple(qz.shape)}, expected ({n_groups}, {-(-out_f * bits // 32)})"
        )
    gs = in_f if group_size == -1 else group_size
    if in_f % gs or n_groups != in_f // gs:
        raise QuantizationError(
            f"{name}: {n_groups} scale groups do not fit in_features={in_f} with group_size={group_size}"
        )
    g = g_idx.to(torch.int64).cpu()
    if int(g.min()) < 0 or int(g.max()) >= n_groups:
        raise QuantizationError(f"{name}.g_idx spans [{int(g.min())}, {int(g.max())}], there are {n_groups} groups")
    half = scales.cpu().to(torch.float16)
    if not torch.equal(half.to(scales.dtype), scales.cpu()) or not bool(torch.isfinite(half).all()):
        raise QuantizationError(f"{name}.scales ({scales.dtype}) are not exactly representable in float16")

    if checkpoint_format == "gptq":
        qz = _v1_shift(qz.cpu(), bits, out_f, +1)
    zeros = unpack_int32(qz.cpu().T, bits, out_f)  # (out, G)
    codes = unpack_int32(qw.cpu(), bits, in_f).T.contiguous()  # (out, in)
    trivial = torch.equal(g, torch.arange(in_f) // gs)
    is_sym = sym and bool((zeros == 2 ** (bits - 1)).all())

    # GPTQ stores float16 scales: a weight written from byte scales comes back with scale_bits=16
    # (same values, same materialize).
    fields: dict[str, Any] = {"bits": bits, "group_size": group_size, "sym": is_sym, "scale_bits": 16}
    if config is not None:
        given = config.model_dump() if isinstance(config, OPTQConfig) else dict(config)
        fields = {**given, **fields}
    else:
        fields["desc_act"] = False
    if not trivial:
        # A scattered g_idx is act-order with dynamic groups, whatever else was recorded.
        fields["desc_act"], fields["static_groups"] = True, False
    cfg = OPTQConfig.model_validate(fields)
    keep_g_idx = stores_g_idx(cfg, in_f)

    out: dict[str, torch.Tensor] = {"codes": pack_codes(codes, bits), "scales": half.T.contiguous()}
    if not is_sym:
        out["zeros"] = pack_codes(zeros, bits)
    if keep_g_idx:
        out["g_idx"] = g.to(torch.int32)
    meta = {"source": f"GPTQ checkpoint ({checkpoint_format})"}
    if sym and not is_sym:
        meta["note"] = "quantize_config says sym, but the zero points vary: loaded as asymmetric"
    return QuantizedWeight(NAME, cfg.model_dump(), (out_f, in_f), out, meta=meta, dtype=torch.float16)
