"""Bit packing: round trips for every width, the exact byte layout, and refused input."""

from __future__ import annotations

import pytest
import torch

from lqmod.packing import SUPPORTED_BITS, pack_codes, packed_nbytes, unpack_codes

LENGTHS = [0, 1, 2, 3, 5, 7, 8, 9, 13, 64, 1001]


def reference_pack(codes: list[int], bits: int) -> list[int]:
    """An independent oracle: the codes as one MSB-first bit string, cut into bytes."""
    stream = "".join(format(c, f"0{bits}b") for c in codes)
    stream += "0" * (-len(stream) % 8)
    return [int(stream[i : i + 8], 2) for i in range(0, len(stream), 8)]


def random_codes(n: int, bits: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_and_layout(bits: int, n: int) -> None:
    codes = random_codes(n, bits, seed=bits * 1000 + n)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.dim() == 1
    assert packed.numel() == packed_nbytes(n, bits) == -(-n * bits // 8)
    assert packed.tolist() == reference_pack(codes.tolist(), bits)
    unpacked = unpack_codes(packed, bits, n)
    assert unpacked.dtype == torch.int64
    assert torch.equal(unpacked, codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_extreme_codes_do_not_bleed_into_neighbours(bits: int) -> None:
    top = 2**bits - 1
    codes = torch.tensor([top, 0, top, top, 0, 0, top, 0, top, top, top])
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, codes.numel()), codes)


@pytest.mark.parametrize(
    ("bits", "codes", "expected"),
    [
        (4, [0x1, 0x2], [0x12]),  # the first code is the high nibble (bitsandbytes' order)
        (4, [0xA, 0xB, 0xC], [0xAB, 0xC0]),  # an odd count: the last low nibble is padding
        (2, [3, 0, 1, 2], [0b11_00_01_10]),
        (1, [1, 0, 1, 1, 0, 0, 0, 0, 1], [0b10110000, 0b10000000]),
        # Eight 3-bit codes fill three bytes: 000 001 010 011 100 101 110 111.
        (3, list(range(8)), [0b00000101, 0b00111001, 0b01110111]),
        (5, [31, 0, 1], [0b11111000, 0b00000010]),  # 11111 00000 00001, one bit of padding
        (6, [0b101010, 0b010101], [0b10101001, 0b01010000]),
        (7, [127, 1], [0b11111110, 0b00000100]),
        (8, [0, 255, 7], [0, 255, 7]),
    ],
)
def test_byte_layout(bits: int, codes: list[int], expected: list[int]) -> None:
    assert pack_codes(torch.tensor(codes), bits).tolist() == expected


def test_codes_of_any_integer_dtype_and_shape_pack_row_major() -> None:
    codes = torch.arange(12).reshape(3, 4) % 16
    flat = pack_codes(codes.flatten(), 4)
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        assert torch.equal(pack_codes(codes.to(dtype), 4), flat)


def test_unpack_reads_only_the_first_n_codes() -> None:
    packed = pack_codes(torch.tensor([1, 2, 3, 4, 5, 6, 7]), 3)
    assert unpack_codes(packed, 3, 4).tolist() == [1, 2, 3, 4]
    assert unpack_codes(packed, 3, 0).tolist() == []


def test_pack_returns_a_copy_at_8_bits() -> None:
    codes = torch.tensor([1, 2, 3], dtype=torch.uint8)
    packed = pack_codes(codes, 8)
    packed[0] = 9
    assert codes[0] == 1


@pytest.mark.parametrize("bits", [0, 9, 16, -4])
def test_unsupported_width_is_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="supported widths"):
        pack_codes(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="supported widths"):
        unpack_codes(torch.zeros(4, dtype=torch.uint8), bits, 4)


@pytest.mark.parametrize(("bits", "bad"), [(4, 16), (4, -1), (2, 4), (3, 8), (8, 256), (1, 2)])
def test_out_of_range_codes_are_refused(bits: int, bad: int) -> None:
    # Silently wrapping would corrupt the neighbouring codes in the same byte.
    with pytest.raises(ValueError, match=rf"codes must lie in \[0, {2**bits}\)"):
        pack_codes(torch.tensor([0, bad, 1]), bits)


def test_too_few_bytes_are_refused() -> None:
    with pytest.raises(ValueError, match="3 packed bytes cannot hold 9 codes of 3 bits"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 9)
