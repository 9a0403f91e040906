"""Byte sizes as users write them: `60MB`, `1.5GiB`, `250000000` (plain bytes).

Decimal units (KB, MB, GB = 10³ⁿ) are what file sizes and `mcomp inspect` show; binary units
(KiB, MiB, GiB) are accepted for people who think in them.
"""
from __future__ import annotations

import re

from .errors import ConfigError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
         "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def is_size(text: str) -> bool:
    """True if `text` carries a byte unit (`400MB`), i.e. is meant as a size, not a ratio."""
    m = _SIZE.match(text)
    return bool(m and m.group(2))


def parse_bytes(text: str, what: str = "size") -> int:
    """`60MB` → 60_000_000. A one-line ConfigError names the accepted units otherwise."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in UNITS:
        raise ConfigError(f"{what} '{text}': expected a number with a unit, e.g. 60MB or 1.5GiB "
                          f"(units: {', '.join(u.upper() or 'bytes' for u in UNITS if u)})")
    n = int(round(float(m.group(1)) * UNITS[unit]))
    if n <= 0:
        raise ConfigError(f"{what} '{text}' must be positive")
    return n


def format_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n:,} B"
