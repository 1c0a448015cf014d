"""Beat's retention job: scheduled only when ``LEASEFLOW_RETENTION`` is set, it purges
runs finished longer ago than that, a bounded number per tick, and logs what it
deleted (an idle tick logs nothing at INFO)."""

from __future__ import annotations

import logging
import os
import uuid
from datetime import UTC, datetime, timedelta

import pydantic
import pytest

from leaseflow.beat import jobs
from leaseflow.beat import tasks as beat_tasks
from leaseflow.settings import Settings
from leaseflow.store.memory import MemoryStore
from tests.contract.workflows import CHECKPOINT, complete, linear

DAY = 86_400.0


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LEASEFLOW_"):
            monkeypatch.delenv(name)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def completed(store: MemoryStore) -> str:
    run_id = store.create_run(
        run_id=str(uuid.uuid4()), wf=linear, checkpoint=CHECKPOINT, input={}, idempotency_key=None
    ).run_id
    claim = store.claim(run_id, 1, owner="w1", ttl=10)
    assert claim is not None and store.commit(claim, complete("ok"), worker="w1") is not None
    return run_id


def test_without_retention_beat_schedules_no_purge():
    settings = Settings()

    assert settings.retention is None
    assert beat_tasks.RETENTION_TASK not in {
        e["task"] for e in beat_tasks.schedule(settings).values()
    }
    assert "leaseflow-retention" not in beat_tasks.schedule(Settings(retention=""))


def test_with_retention_beat_sends_the_purge_with_its_age(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LEASEFLOW_RETENTION", "30d")
    monkeypatch.setenv("LEASEFLOW_RETENTION_INTERVAL", "60")

    entry = beat_tasks.schedule(Settings())["leaseflow-retention"]

    assert entry["task"] == beat_tasks.RETENTION_TASK
    assert entry["schedule"] == timedelta(seconds=60)
    assert entry["args"] == (30 * DAY,)
    assert entry["options"]["queue"] == "leaseflow.beat"
    assert beat_tasks.RETENTION_TASK in beat_tasks.TICK_TASKS  # idle ticks stay quiet


@pytest.mark.parametrize("value", ["7x", "-1d", "0", "d7"])
def test_a_malformed_retention_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch, value: str):
    monkeypatch.setenv("LEASEFLOW_RETENTION", value)

    with pytest.raises(pydantic.ValidationError, match="retention"):
        Settings()


def test_the_retention_job_purges_old_finished_runs_and_logs_it(caplog: pytest.LogCaptureFixture):
    # Given: two runs finished 31 days ago, one finished today, one still pending
    clock = Clock()
    store = MemoryStore(clock=clock)
    old = [completed(store), completed(store)]
    clock.now += timedelta(days=31)
    recent = completed(store)
    pending = store.create_run(
        run_id=str(uuid.uuid4()), wf=linear, checkpoint=CHECKPOINT, input={}, idempotency_key=None
    ).run_id

    # When the job runs with a 30-day retention
    with caplog.at_level(logging.INFO, logger="leaseflow"):
        done = jobs.purge_finished(store, older_than=30 * DAY)
        idle = jobs.purge_finished(store, older_than=30 * DAY)

    # Then the old runs are gone, and it said so once; the idle tick said nothing
    assert (done.runs, done.steps, idle.runs) == (2, 2, 0)
    assert {r.id for r in store.list_runs()} == {recent, pending}
    purged = [r for r in caplog.records if getattr(r, "action", None) == "runs_purged"]
    assert [(r.runs, r.steps, r.older_than) for r in purged] == [(2, 2, 30 * DAY)]
    assert not set(old) & {r.id for r in store.list_runs()}


def test_one_tick_purges_at_most_max_runs():
    clock = Clock()
    store = MemoryStore(clock=clock)
    for _ in range(5):
        completed(store)
    clock.now += timedelta(days=2)

    first = jobs.purge_finished(store, older_than=DAY, max_runs=3, batch=2)
    second = jobs.purge_finished(store, older_than=DAY, max_runs=3, batch=2)

    assert (first.runs, second.runs) == (3, 2)
    assert store.list_runs() == []
