from __future__ import annotations

import pytest

from lqmod.allocation.budget import Budget, parse_budget
from lqmod.config import ConfigError


@pytest.mark.parametrize(
    ("text", "bpp"),
    [("3.25", 3.25), ("3.25bits", 3.25), (" 2.75 bits/param ", 2.75), ("4", 4.0), ("3bit", 3.0), ("2.5bpp", 2.5)],
)
def test_bits_per_param(text: str, bpp: float) -> None:
    b = parse_budget(text)
    assert b.bits_per_param == bpp
    assert b.nbytes is None


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("12MB", 12_000_000), ("12MiB", 12 * 2**20), ("1234567B", 1234567), ("1.5kB", 1500), ("2gib", 2 * 2**30)],
)
def test_bytes(text: str, nbytes: int) -> None:
    b = parse_budget(text)
    assert b.nbytes == nbytes
    assert b.total_bits(10**9) == nbytes * 8


def test_numbers_are_bits_per_param() -> None:
    assert parse_budget(3.25) == Budget(bits_per_param=3.25, text="3.25")
    assert parse_budget(3).bits_per_param == 3.0


@pytest.mark.parametrize("bad", ["", "abc", "3.25 MBits", "-3", "0", "1.5B", "12 TB", "nan"])
def test_rejects_with_what_is_accepted(bad: str) -> None:
    with pytest.raises(ConfigError, match="accepted"):
        parse_budget(bad)


def test_rejects_other_types() -> None:
    with pytest.raises(ConfigError, match="accepted"):
        parse_budget(True)
    with pytest.raises(ConfigError, match="accepted"):
        parse_budget([3.0])  # type: ignore[arg-type]


def test_total_bits_never_exceeds_and_survives_float_rounding() -> None:
    # 3.3 * 10 is 32.999999999999996 in floats; the budget is 33 bits, not 32.
    assert parse_budget("3.3").total_bits(10) == 33
    assert parse_budget("3.25").total_bits(7) == 22  # 22.75 rounds down: never over budget
