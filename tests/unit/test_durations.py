"""Durations as ``leaseflow purge --older-than`` and ``LEASEFLOW_RETENTION`` take them
(leaseflow/durations.py)."""

from __future__ import annotations

import pytest

from leaseflow import durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("30m", 1800),
        ("12h", 43_200),
        ("7d", 604_800),
        ("2w", 1_209_600),
        ("1d12h", 129_600),
        ("1h30m15s", 5415),
        ("1.5h", 5400),
        ("3600", 3600),
        ("0.5", 0.5),
        ("0", 0),
        (" 7d ", 604_800),
    ],
)
def test_a_duration_is_read_as_seconds(text: str, seconds: float):
    assert durations.parse(text) == seconds


@pytest.mark.parametrize(
    "text", ["7x", "-1d", "", " ", "d7", "7 d", "1d 12h", "7D", "1e3", "inf", "nan", "1.d", "h"]
)
def test_a_malformed_duration_is_refused_saying_what_is_expected(text: str):
    with pytest.raises(ValueError, match="duration such as 90s, 30m, 12h, 7d"):
        durations.parse(text)


def test_a_unit_given_twice_is_refused():
    with pytest.raises(ValueError, match="names a unit twice"):
        durations.parse("1d1d")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (90, "1m30s"), (604_800, "7d"), (129_600, "1d12h"), (1_209_600, "14d")],
)
def test_a_duration_is_described_in_days_hours_minutes_and_seconds(seconds: float, text: str):
    assert durations.describe(seconds) == text
    assert durations.parse(text) == seconds
