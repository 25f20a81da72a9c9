"""Sizes and durations as Fuzzfiles write them, parsed to numbers in one place.

Sizes (`resource.memory.size`, v4 `volumes.*.size`) are a number with an optional unit; no
unit means bytes. Decimal (KB, MB, ...) and binary (KiB, MiB, ...) units are accepted in any
letter case, because shipped catalog templates write `512MIB`. Fractions are allowed
(`0.5GiB`); a fractional byte count is rounded up.

Durations (`policy.timeout.execute`) use Go's `time.Duration` syntax (`2m`, `10m0s`,
`1h30m`, `1.5h`), which is what the Fuzzball platform parses them with.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

__all__ = [
    "MAX_DURATION",
    "MAX_SIZE",
    "UnitError",
    "format_size",
    "parse_duration",
    "parse_size",
]


class UnitError(ValueError):
    """A size or duration that does not parse; the message says what would be right."""


_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "eb": 10**18,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
    "eib": 2**60,
}
# The largest size and duration: Go's int64 counts of bytes and of nanoseconds (~292 years).
MAX_SIZE = 2**63 - 1
MAX_DURATION = (2**63 - 1) / 10**9
_SIZE_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[A-Za-z]*)\s*$")
_SIZE_HINT = "write a number with an optional unit, such as 536870912, 512MiB, 14GiB or 1GB"


def parse_size(value: object) -> int:
    """Return the number of bytes that a size such as `14GiB`, `1GB` or `512` stands for."""
    size = _size(value)
    if size > MAX_SIZE:
        raise UnitError(f"size {_quote(value)} is 8EiB or more; sizes are 64-bit counts of bytes")
    return size


def _quote(value: object) -> str:
    """A value for a message: short, and no huge int converted to text (Python refuses)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return "(a number of more than 19 digits)"
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}... ({len(text):,} characters)"


def _size(value: object) -> int:
    if isinstance(value, bool):
        raise UnitError(f"{value!r} is not a size; {_SIZE_HINT}")
    if isinstance(value, int):
        if value < 0:
            raise UnitError(f"size {value} is negative; {_SIZE_HINT}")
        return value
    if isinstance(value, float):
        if value < 0 or not math.isfinite(value):
            raise UnitError(f"size {value} is not a valid byte count; {_SIZE_HINT}")
        return math.ceil(value)
    if not isinstance(value, str):
        raise UnitError(f"expected a size, got {type(value).__name__}; {_SIZE_HINT}")
    match = _SIZE_RE.match(value)
    if match is None:
        raise UnitError(f"{value!r} is not a size; {_SIZE_HINT}")
    unit = match["unit"].lower()
    if unit not in _SIZE_UNITS:
        raise UnitError(
            f"{value!r} has an unknown unit {match['unit']!r}; use B, KB, MB, GB, TB, PB, EB "
            "or KiB, MiB, GiB, TiB, PiB, EiB"
        )
    return math.ceil(Decimal(match["num"]) * _SIZE_UNITS[unit])


def format_size(n_bytes: int) -> str:
    """Render a byte count with the largest binary unit that divides it exactly."""
    for unit in ("EiB", "PiB", "TiB", "GiB", "MiB", "KiB"):
        factor = _SIZE_UNITS[unit.lower()]
        if n_bytes and n_bytes % factor == 0:
            return f"{n_bytes // factor}{unit}"
    return f"{n_bytes}B"


# Go's time.ParseDuration units, in seconds (µs and μs are Go's own spellings of us).
_DURATION_UNITS: dict[str, Decimal] = {
    "ns": Decimal("1e-9"),
    "us": Decimal("1e-6"),
    "µs": Decimal("1e-6"),
    "μs": Decimal("1e-6"),
    "ms": Decimal("1e-3"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)?")
_DURATION_HINT = "write a Go duration such as 30s, 10m, 1h30m or 10m0s"


def parse_duration(value: object) -> float:
    """Return the seconds that a Go-style duration such as `1h30m` or `10m0s` stands for."""
    seconds = _duration(value)
    if seconds > MAX_DURATION:
        raise UnitError(f"duration {_quote(value)} is longer than Go's longest, about 292 years")
    return seconds


def _duration(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UnitError(f"expected a duration, got {type(value).__name__}; {_DURATION_HINT}")
    if isinstance(value, int | float):
        if value == 0:
            return 0.0
        raise UnitError(f"duration {value!r} has no unit; write {value}s or {value}m")
    text = value.strip()
    if text.startswith("-"):
        raise UnitError(f"duration {value!r} is negative; {_DURATION_HINT}")
    text = text.removeprefix("+")
    if text == "0":
        return 0.0
    if not text:
        raise UnitError(f"duration is empty; {_DURATION_HINT}")
    total = Decimal(0)
    pos = 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise UnitError(f"{value!r} is not a duration; {_DURATION_HINT}")
        number, unit = match.groups()
        if unit is None:
            rest = text[match.end() :]
            if rest[:1].isalpha():
                raise UnitError(
                    f"{value!r} is not a duration: unknown unit {rest.split()[0]!r}; use h, m, s, "
                    "ms, us or ns (no days: write 24h)"
                )
            raise UnitError(f"{value!r}: {number!r} has no unit; {_DURATION_HINT}")
        try:
            total += Decimal(number) * _DURATION_UNITS[unit]
        except InvalidOperation as exc:  # pragma: no cover - the regex admits only numbers
            raise UnitError(f"{value!r} is not a duration; {_DURATION_HINT}") from exc
        pos = match.end()
    return float(total)
