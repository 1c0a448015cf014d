"""Human durations, as ``leaseflow purge --older-than`` and ``LEASEFLOW_RETENTION`` take
them: ``90s``, ``30m``, ``12h``, ``7d``, ``2w``, combinations such as ``1d12h``, or plain
seconds (``3600``). Pure: no I/O."""

from __future__ import annotations

import re

#: Seconds per unit.
UNITS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}

_NUMBER = r"\d+(?:\.\d+)?"
_PLAIN = re.compile(_NUMBER)
_PART = re.compile(rf"({_NUMBER})([wdhms])")
_WHOLE = re.compile(rf"(?:{_NUMBER}[wdhms])+")

EXPECTED = "a duration such as 90s, 30m, 12h, 7d, 2w, 1d12h, or plain seconds (3600)"


def parse(text: str) -> float:
    """The seconds ``text`` names; ``ValueError`` (saying what is expected) otherwise."""
    value = text.strip()
    if _PLAIN.fullmatch(value):
        return float(value)
    if not _WHOLE.fullmatch(value):
        raise ValueError(f"{text!r} is not {EXPECTED}")
    units = [unit for _, unit in _PART.findall(value)]
    if len(set(units)) != len(units):
        raise ValueError(f"{text!r} names a unit twice: expected {EXPECTED}")
    return float(sum(float(number) * UNITS[unit] for number, unit in _PART.findall(value)))


def describe(seconds: float) -> str:
    """``seconds`` in whole days, hours, minutes and seconds: ``1d12h``, ``1m30s``, ``0s``."""
    left = round(seconds)
    parts = []
    for unit, size in UNITS.items():
        if unit == "w":  # 7d reads as given, not as 1w
            continue
        count, left = divmod(left, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"
