"""Storage budgets: an average number of bits per parameter, or a size in bytes."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lqmod.config import ConfigError

__all__ = ["Budget", "parse_budget"]

_BYTE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_BITS_RE = re.compile(rf"^\s*(?P<num>{_NUMBER})\s*(?:bits?(?:\s*/\s*param)?|bpp)?\s*$", re.IGNORECASE)
_BYTES_RE = re.compile(rf"^\s*(?P<num>{_NUMBER})\s*(?P<unit>[kmg]i?b|b)\s*$", re.IGNORECASE)
ACCEPTED = "an average of bits per parameter ('3.25', '3.25bits') or a size in bytes ('40MB', '12MiB', '1234567B')"


@dataclass(frozen=True)
class Budget:
    """A storage budget for the quantized matrices (not embeddings, norms or biases).

    Exactly one of ``bits_per_param`` and ``nbytes`` is set.
    """

    bits_per_param: float | None = None
    nbytes: int | None = None
    text: str = ""

    def __post_init__(self) -> None:
        if (self.bits_per_param is None) == (self.nbytes is None):
            raise ConfigError("a budget is either bits per parameter or bytes, exactly one of them")
        value = self.bits_per_param if self.bits_per_param is not None else self.nbytes
        if value is None or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"budget must be a positive, finite amount, got {value!r}; accepted: {ACCEPTED}")

    def total_bits(self, n_params: int) -> int:
        """The budget in whole bits for ``n_params`` parameters (rounded down: never exceeded)."""
        if self.nbytes is not None:
            return self.nbytes * 8
        assert self.bits_per_param is not None
        # A float product such as 3.3 * 10 = 32.999999999999996 would lose a whole bit.
        exact = self.bits_per_param * n_params
        return math.floor(exact + 1e-9 * max(1.0, exact))

    def describe(self) -> str:
        if self.nbytes is not None:
            return f"{self.nbytes} bytes"
        return f"{self.bits_per_param:g} bits/param"


def parse_budget(value: str | float | int | Budget) -> Budget:
    """``3.25`` / ``"3.25"`` / ``"3.25bits"`` (avg bits per parameter) or ``"40MB"`` / ``"12MiB"`` / ``"123B"``.

    A bare number is bits per parameter. Byte units: B, kB, MB, GB (powers of 1000) and
    KiB, MiB, GiB (powers of 1024), case-insensitive. Anything else is a ConfigError.
    """
    if isinstance(value, Budget):
        return value
    if isinstance(value, bool):
        raise ConfigError(f"budget {value!r} is not a number; accepted: {ACCEPTED}")
    if isinstance(value, int | float):
        return Budget(bits_per_param=float(value), text=str(value))
    if not isinstance(value, str):
        raise ConfigError(f"budget {value!r} has type {type(value).__name__}; accepted: {ACCEPTED}")
    if m := _BITS_RE.match(value):
        return Budget(bits_per_param=float(m["num"]), text=value.strip())
    if m := _BYTES_RE.match(value):
        amount = float(m["num"]) * _BYTE_UNITS[m["unit"].lower()]
        if amount != int(amount):
            raise ConfigError(f"budget {value!r} is not a whole number of bytes; accepted: {ACCEPTED}")
        return Budget(nbytes=int(amount), text=value.strip())
    raise ConfigError(f"budget {value!r} not understood; accepted: {ACCEPTED}")
