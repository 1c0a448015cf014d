"""Lease settings are checked against each other (leaseflow/settings.py)."""

from __future__ import annotations

import os

import pytest

from leaseflow import errors
from leaseflow.settings import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LEASEFLOW_"):
            monkeypatch.delenv(name)


def test_a_heartbeat_slower_than_half_the_lease_is_refused_naming_both_variables(
    monkeypatch: pytest.MonkeyPatch,
):
    # Given the settings a new user tried: a 10 s lease heartbeated every 30 s
    monkeypatch.setenv("LEASEFLOW_LEASE_TTL", "10")
    monkeypatch.setenv("LEASEFLOW_HEARTBEAT_INTERVAL", "30")
    # When they are read
    with pytest.raises(errors.ConfigurationError) as caught:
        Settings()
    # Then the error names both variables and their values
    message = str(caught.value)
    assert "LEASEFLOW_HEARTBEAT_INTERVAL (30 s)" in message
    assert "half of LEASEFLOW_LEASE_TTL (10 s)" in message
    assert "REAPER" not in message  # 5 s < 10 s: only what is wrong is named
    assert caught.value.code == "E-CONFIG"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        pytest.param({"lease_ttl": 30, "heartbeat_interval": 15}, "HEARTBEAT", id="hb-at-half"),
        pytest.param({"lease_ttl": 4, "reaper_interval": 4}, "REAPER", id="reaper-at-ttl"),
        pytest.param({"lease_ttl": 4, "reaper_interval": 9}, "REAPER", id="reaper-over-ttl"),
    ],
)
def test_timings_at_or_past_the_bound_are_refused(values: dict[str, float], named: str):
    with pytest.raises(errors.ConfigurationError, match=f"LEASEFLOW_{named}_INTERVAL"):
        Settings(**values)


def test_both_faults_are_named_in_one_error():
    with pytest.raises(errors.ConfigurationError) as caught:
        Settings(lease_ttl=2, heartbeat_interval=1, reaper_interval=2)
    assert "LEASEFLOW_HEARTBEAT_INTERVAL" in str(caught.value)
    assert "LEASEFLOW_REAPER_INTERVAL" in str(caught.value)


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"lease_ttl": 2.0, "heartbeat_interval": 0.5, "reaper_interval": 0.5}, id="t"),
        pytest.param({"lease_ttl": 30, "heartbeat_interval": 14.9, "reaper_interval": 29}, id="b"),
    ],
)
def test_timings_inside_the_bounds_are_accepted(values: dict[str, float]):
    settings = Settings(**values)
    assert settings.heartbeat_interval < settings.lease_ttl / 2
    assert settings.reaper_interval < settings.lease_ttl
