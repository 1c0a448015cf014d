"""Beat's retention task on a real database: the age beat sends with it decides, and
without one the worker's ``LEASEFLOW_RETENTION`` does (or nothing is purged)."""

from __future__ import annotations

import psycopg

from leaseflow.beat import tasks as beat_tasks
from leaseflow.settings import Settings
from leaseflow.tasks import runtime


def finished_runs(client, db: psycopg.Connection, count: int, *, days_ago: float) -> list[str]:
    runs = [client.start("linear5", {"n": 1}) for _ in range(count)]
    for run_id in runs:
        client.cancel(run_id)
    db.execute(
        "UPDATE lf_runs SET finished_at = finished_at - make_interval(days => %s)"
        " WHERE id = ANY(%s::uuid[])",
        (days_ago, runs),
    )
    return runs


def remaining(db: psycopg.Connection) -> int:
    return int(db.execute("SELECT count(*) FROM lf_runs").fetchone()[0])


def test_the_retention_task_purges_what_beat_asks(app, client, db: psycopg.Connection):
    finished_runs(client, db, 3, days_ago=40)
    finished_runs(client, db, 2, days_ago=1)
    task = app.tasks[beat_tasks.RETENTION_TASK]

    assert task(30 * 86_400.0) == 3  # the age beat's schedule sends
    assert remaining(db) == 2
    assert task() == 0  # no age sent and none set for this worker: nothing


def test_without_an_age_the_task_uses_the_workers_retention(
    app, client, db: psycopg.Connection, settings: Settings
):
    finished_runs(client, db, 2, days_ago=3)
    runtime.configure(Settings(**{**settings.model_dump(), "retention": "2d"}))
    try:
        assert app.tasks[beat_tasks.RETENTION_TASK]() == 2
    finally:
        runtime.configure(settings)
    assert remaining(db) == 0
