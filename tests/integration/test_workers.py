"""Real ``celery worker`` processes on Redis and RabbitMQ."""

from __future__ import annotations

import pytest

from leaseflow.client import Client
from tests.helpers import WorkerProcess, eventually, processes
from tests.workflows import basic

RUNS = 200


@pytest.fixture(params=["redis", "amqp"])
def broker_settings(request, settings):
    url = request.getfixturevalue("redis_url" if request.param == "redis" else "amqp_url")
    return settings.model_copy(update={"broker_url": url})


def test_200_runs_of_5_states_on_two_worker_processes(broker_settings, app, db, tmp_path):
    # Given two worker processes on the broker under test
    settings = broker_settings
    w1 = WorkerProcess(settings, tmp_path, name="w1")
    w2 = WorkerProcess(settings, tmp_path, name="w2")
    with processes(w1, w2), Client(settings=settings) as client:
        w1.wait_ready()
        w2.wait_ready()
        # When 200 runs of the 5-state workflow are started
        run_ids = [client.start(basic.linear, {"n": i}) for i in range(RUNS)]

        # Then all complete
        def finished() -> bool:
            row = db.execute(
                "SELECT count(*) FROM lf_runs WHERE status IN ('completed', 'failed')"
            ).fetchone()
            return row[0] == RUNS

        eventually(finished, timeout=120, interval=0.25, message="all runs finished")
    statuses = db.execute("SELECT status, count(*) FROM lf_runs GROUP BY 1").fetchall()
    assert statuses == [("completed", RUNS)]
    # and every run has exactly 5 step rows with consecutive seqs 1..5
    bad = db.execute(
        """
        SELECT run_id FROM lf_steps GROUP BY run_id
        HAVING count(*) <> 5 OR min(seq) <> 1 OR max(seq) <> 5
            OR array_agg(state ORDER BY seq) <> ARRAY['s1','s2','s3','s4','s5']
        """
    ).fetchall()
    assert bad == []
    assert db.execute("SELECT count(DISTINCT run_id) FROM lf_steps").fetchone() == (RUNS,)
    assert set(run_ids) == {r[0] for r in db.execute("SELECT id::text FROM lf_runs")}
    # and both processes did work
    workers = db.execute("SELECT DISTINCT split_part(worker, ':', 2) FROM lf_steps").fetchall()
    assert len(workers) >= 2


def test_state_timeout_is_a_retried_state_error(settings, app, db, tmp_path):
    # Given a state with timeout=1 s that sleeps 5 s on its first attempt
    worker = WorkerProcess(settings, tmp_path)
    with processes(worker), Client(settings=settings) as client:
        worker.wait_ready()
        run_id = client.start(basic.timed, {"sleep": 5.0})
        # When the soft time limit interrupts it
        run = client.wait_for(run_id, timeout=30)
    # Then the attempt counted as a state error and the retry completed the run
    assert run.status == "completed", run
    bounded = [(s.attempt, s.outcome) for s in run.steps if s.state == "bounded"]
    assert bounded == [(1, "retry"), (2, "next")]
    assert "SoftTimeLimitExceeded" in run.steps[0].error
