"""Sizes in bytes, read from and written for people: "22GiB" <-> 23622320128."""

from __future__ import annotations

import math
import re

from offload_moe.errors import ConfigError


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
# No machine has a petabyte of memory: a bigger size is a typo (a missing unit, an extra digit).
MAX_BYTES = 2**50
# A sign, digits with an optional fraction and exponent (or inf/nan, refused below with their
# own message rather than "not a size"), then a unit.
_SIZE = re.compile(r"\s*([+-]?(?:[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?|inf|infinity|nan))\s*([a-zA-Z]*)\s*", re.I)


def parse_bytes(value: str | int | float, what: str = "memory") -> int:
    """'22GiB', '500MB', '1.5g' or a number of bytes -> bytes; ConfigError naming `what` and the
    value for anything that is not a positive, finite size of at most MAX_BYTES."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _checked(float(value) if isinstance(value, float) else value, value, what)
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"{what}={value!r} is not a size; write e.g. '22GiB', '16GB' or '512MiB'")
    number = float(match.group(1))
    if not math.isfinite(number):
        raise ConfigError(f"{what}={value!r} must be a finite size; write e.g. '22GiB'")
    return _checked(number * _UNITS[match.group(2).lower()], value, what)


def _checked(size: int | float, value: str | int | float, what: str) -> int:
    if isinstance(size, float) and not math.isfinite(size):
        raise ConfigError(f"{what}={value!r} must be a finite size; write e.g. '22GiB'")
    if size <= 0 or int(size) <= 0:
        raise ConfigError(f"{what}={value!r} must be positive")
    if size > MAX_BYTES:
        raise ConfigError(f"{what}={value!r} is more than any machine has (at most {format_bytes(MAX_BYTES)})")
    return int(size)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
