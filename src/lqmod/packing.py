"""Bit packing shared by quantizers that store k-bit codes.

Codes are packed most-significant-bit first as one bit stream: for 4 bits the first code
is the high nibble of byte 0 (bitsandbytes' order), for 2 bits the first code is bits 7-6,
for 3 bits eight codes fill three bytes.
"""

from __future__ import annotations

import torch

from lqmod.types import packed_nbytes

__all__ = ["decode_codes", "pack_codes", "packed_nbytes", "unpack_codes"]

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported widths: {SUPPORTED_BITS}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a flat uint8 tensor of ``ceil(n*bits/8)`` bytes."""
    _check_bits(bits)
    # An out-of-range code would not fail below: it would wrap (uint8) or carry into its
    # neighbours' bits and corrupt them silently. Refuse it here, once per quantize call.
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(
            f"codes must lie in [0, {1 << bits}) to be packed in {bits} bits; "
            f"got values in [{int(codes.min())}, {int(codes.max())}]"
        )
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:
        per = 8 // bits
        pad = (-flat.numel()) % per
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        groups = flat.view(-1, per).to(torch.int32)
        shifts = torch.arange(per - 1, -1, -1, device=flat.device, dtype=torch.int32) * bits
        return (groups << shifts).sum(dim=1).to(torch.uint8)
    # Widths that do not divide 8: write the bit stream explicitly.
    n = flat.numel()
    positions = torch.arange(bits - 1, -1, -1, device=flat.device, dtype=torch.uint8)
    stream = ((flat.unsqueeze(1) >> positions) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = 1 << torch.arange(7, -1, -1, device=flat.device, dtype=torch.int32)
    out = (stream.view(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)
    assert out.numel() == packed_nbytes(n, bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes as int64."""
    _check_bits(bits)
    flat = packed.reshape(-1)
    if flat.numel() < packed_nbytes(n, bits):
        raise ValueError(f"{flat.numel()} packed bytes cannot hold {n} codes of {bits} bits")
    if bits == 8:
        return flat[:n].long()
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per - 1, -1, -1, device=flat.device, dtype=torch.uint8) * bits
        mask = (1 << bits) - 1
        codes = (flat.unsqueeze(1) >> shifts) & mask
        return codes.reshape(-1)[:n].long()
    # Widths that do not divide 8: eight codes fill exactly `bits` bytes, so read the stream
    # as runs of `bits` bytes, each one big-endian word of 8 codes (at most 56 bits), and
    # shift the codes out of it. No per-bit intermediate (the old way was 8 bytes per bit).
    runs = -(-n // 8)
    raw = flat[: runs * bits]
    if raw.numel() < runs * bits:
        raw = torch.cat([raw, raw.new_zeros(runs * bits - raw.numel())])
    raw = raw.view(runs, bits)
    word = raw[:, 0].long()
    for k in range(1, bits):
        word = (word << 8) | raw[:, k]
    shifts = torch.arange(7, -1, -1, device=flat.device, dtype=torch.int64) * bits
    return ((word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n]


def decode_codes(packed: torch.Tensor, bits: int, n: int, table: torch.Tensor) -> torch.Tensor:
    """``table[code]`` for the first ``n`` packed codes: ``table[unpack_codes(...)]``, faster.

    For widths that divide 8 every byte holds ``8 // bits`` whole codes, so one gather of
    the bytes through a 256-row table of their decoded values replaces the unpack (with its
    int64 code per weight) and the per-code gather. Other widths go the same way in units
    of whole codes that a run of 8 codes (``bits`` bytes) splits into (see
    :func:`_decode_runs`). The values are the table's own, bit for bit; the result is 1-D
    with ``table``'s dtype.
    """
    _check_bits(bits)
    flat = packed.reshape(-1)
    if flat.numel() < packed_nbytes(n, bits):
        raise ValueError(f"{flat.numel()} packed bytes cannot hold {n} codes of {bits} bits")
    if table.dim() != 1 or table.numel() < 1 << bits:
        raise ValueError(f"table must be 1-D with at least {1 << bits} entries, got shape {tuple(table.shape)}")
    if bits == 8:
        return torch.index_select(table, 0, flat[:n].int())
    if 8 % bits:
        return _decode_runs(flat, bits, n, table)
    per = 8 // bits
    every_byte = torch.arange(256, device=flat.device, dtype=torch.uint8)
    rows = table[unpack_codes(every_byte, bits, 256 * per)].view(256, per)
    nbytes = packed_nbytes(n, bits)
    out = torch.index_select(rows, 0, flat[:nbytes].int()).view(-1)
    return out if out.numel() == n else out[:n]


# Codes per table row for widths that do not divide 8: a unit of that many codes is read
# from a run's word at once. 3 bits: 4 codes (12-bit units, a 4096-row table); 5-7 bits:
# 2 codes (a 2**(2*bits)-row table, at most 16384 rows).
_UNIT_CODES = {3: 4, 5: 2, 6: 2, 7: 2}


def _decode_runs(flat: torch.Tensor, bits: int, n: int, table: torch.Tensor) -> torch.Tensor:
    """:func:`decode_codes` for 3, 5, 6 and 7 bits.

    Eight codes fill exactly ``bits`` bytes (a run), read as one big-endian word. The word
    splits into units of ``k`` whole codes (:data:`_UNIT_CODES`), and one gather of the
    units through a table of every unit's ``k`` decoded values writes the output: per
    weight, the only intermediates are the run words and unit indices (``8 / k`` bytes,
    less than a float32 output's 4), and no int64 code is ever formed.
    """
    k = _UNIT_CODES[bits]
    unit_bits = k * bits
    runs = -(-n // 8)
    raw = flat[: runs * bits]
    if raw.numel() < runs * bits:  # the last run is short: pad it (the stream's own bytes are copied once)
        raw = torch.cat([raw, raw.new_zeros(runs * bits - raw.numel())])
    raw = raw.view(runs, bits)
    # 3 bits: a 24-bit word fits int32, halving the word's bytes; wider runs need int64.
    wide = torch.int32 if bits * 8 < 32 else torch.int64
    word = raw[:, 0].to(wide)
    for j in range(1, bits):
        word = (word << 8).bitwise_or_(raw[:, j])
    shifts = torch.arange(8 // k - 1, -1, -1, device=flat.device, dtype=wide) * unit_bits
    units = (word.unsqueeze(1) >> shifts).bitwise_and_((1 << unit_bits) - 1).view(-1)
    rows = _unit_table(table, bits, k)
    out = torch.index_select(rows, 0, units).view(-1)
    return out if out.numel() == n else out[:n]


def _unit_table(table: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """(2**(k*bits), k): row ``u`` holds the decoded values of the ``k`` codes of unit ``u``,
    first code in the most significant bits."""
    every = torch.arange(1 << (k * bits), device=table.device, dtype=torch.int32)
    shifts = torch.arange(k - 1, -1, -1, device=table.device, dtype=torch.int32) * bits
    codes = (every.unsqueeze(1) >> shifts).bitwise_and_((1 << bits) - 1)
    return table[codes.long()]
