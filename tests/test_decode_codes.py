"""decode_codes: table[unpack_codes(...)] through byte tables, bit for bit."""

from __future__ import annotations

import pytest
import torch

from lqmod.packing import SUPPORTED_BITS, decode_codes, pack_codes, unpack_codes


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 1001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_unpack_then_gather(bits: int, n: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(bits * 7 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=gen)
    table = torch.randn(2**bits, generator=gen).to(dtype)
    packed = pack_codes(codes, bits)
    got = decode_codes(packed, bits, n, table)
    assert got.dtype == dtype and got.shape == (n,)
    assert torch.equal(got, table[unpack_codes(packed, bits, n)])


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n", [0, 2, 5, 15, 16, 17, 23, 24, 25, 4099])
def test_longer_streams_wider_tables_and_half_dtypes(bits: int, n: int) -> None:
    # The run decoder of widths that do not divide 8 reads whole runs: trailing bytes past
    # the n-th code, a table with spare entries and 16-bit tables must not change a value.
    gen = torch.Generator().manual_seed(bits * 13 + n)
    codes = torch.randint(0, 2**bits, (n + 5,), generator=gen)
    packed = pack_codes(codes, bits)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        table = torch.randn(2**bits + 3, generator=gen).to(dtype)
        got = decode_codes(packed, bits, n, table)
        assert got.dtype == dtype and got.shape == (n,)
        assert torch.equal(got, table[codes[:n]]), (bits, n, dtype)


def test_refuses_short_input() -> None:
    with pytest.raises(ValueError, match="2 packed bytes cannot hold 5 codes of 4 bits"):
        decode_codes(torch.zeros(2, dtype=torch.uint8), 4, 5, torch.zeros(16))
    with pytest.raises(ValueError, match="table must be 1-D with at least 16 entries"):
        decode_codes(torch.zeros(2, dtype=torch.uint8), 4, 4, torch.zeros(8))
