"""Parallel and Map on real ``celery worker`` processes and Redis.

With a result backend the branches run as a Celery chord (its body is the join's
wake-up); without one (the embedded default) the last branch wakes the join itself.
Either way the join runs exactly once, with every result, in order.
"""

from __future__ import annotations

import pytest

from leaseflow.client import Client
from tests.helpers import BeatProcess, WorkerProcess, eventually, processes
from tests.workflows import fanout

FANOUT = "tests.workflows.basic,tests.workflows.fanout"


@pytest.fixture(params=["chord", "no-backend"])
def fan_settings(request, settings, redis_url):
    backend = redis_url if request.param == "chord" else None
    return settings.model_copy(update={"workflows": FANOUT.split(","), "result_backend": backend})


def _all_finished(db, n: int) -> bool:
    row = db.execute(
        "SELECT count(*) FROM lf_runs WHERE status IN ('completed', 'failed')"
    ).fetchone()
    return row[0] == n


def _assert_joined_once(db, runs: int, width: int) -> None:
    assert db.execute("SELECT status, count(*) FROM lf_runs GROUP BY 1").fetchall() == [
        ("completed", runs)
    ]
    # one group per run, every branch counted once, the join executed once per run
    groups = db.execute(
        "SELECT done, failed, width, status, count(*) FROM lf_groups GROUP BY 1, 2, 3, 4"
    )
    assert groups.fetchall() == [(width, 0, width, "joined", runs)]
    joins = db.execute(
        "SELECT count(*) FROM lf_steps WHERE state = 'joined' GROUP BY run_id HAVING count(*) <> 1"
    ).fetchall()
    assert joins == []
    outputs = db.execute("SELECT output FROM lf_runs").fetchall()
    expected = [{"index": i, "label": "ctx"} for i in range(width)]
    assert all(o[0]["results"] == expected for o in outputs)


@pytest.mark.parametrize(("runs", "width"), [(50, 10), (5, 100)])
def test_every_join_fires_once_with_all_results_in_order(
    fan_settings, app, db, tmp_path, runs, width
):
    w1 = WorkerProcess(fan_settings, tmp_path, name="w1", concurrency=2)
    with processes(w1), Client(settings=fan_settings) as client:
        w1.wait_ready()
        for _ in range(runs):
            client.start(fanout.parallel, {"width": width})
        eventually(
            lambda: _all_finished(db, runs),
            timeout=180,
            interval=0.25,
            message="all fan-out runs finished",
        )
    _assert_joined_once(db, runs, width)


def test_lost_chord_callback_is_repaired_by_beat_once(settings, redis_url, app, db, tmp_path):
    # Given chords whose callback is never published (the result backend "lost" it)
    fan = settings.model_copy(update={"workflows": FANOUT.split(","), "result_backend": redis_url})
    worker = WorkerProcess(
        fan, tmp_path, name="w1", concurrency=2, faultpoints="chord_callback_lost=on"
    )
    beat = BeatProcess(fan, tmp_path)
    with processes(worker, beat), Client(settings=fan) as client:
        worker.wait_ready()
        for _ in range(3):
            client.start(fanout.parallel, {"width": 4})
        # When beat's dispatcher finds the joins overdue
        eventually(
            lambda: _all_finished(db, 3), timeout=60, interval=0.25, message="joins repaired"
        )
        log = worker.log()
    # Then each join fired once, woken by the repair
    _assert_joined_once(db, 3, 4)
    assert "action=run_redispatched" in log


def test_map_of_200_items_keeps_at_most_10_in_flight(settings, app, db, tmp_path):
    # 200 items: the window of 10 fills, and is refilled 190 times, in order
    db.execute("CREATE TABLE inflight (n int)")
    db.execute(
        """
        CREATE FUNCTION record_inflight() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO inflight SELECT count(*) FROM lf_branches
             WHERE status IN ('pending', 'running');
            RETURN NULL;
        END $$;
        CREATE TRIGGER inflight AFTER INSERT OR UPDATE ON lf_branches
            FOR EACH STATEMENT EXECUTE FUNCTION record_inflight();
        """
    )
    fan = settings.model_copy(update={"workflows": FANOUT.split(",")})
    worker = WorkerProcess(fan, tmp_path, name="w1", concurrency=2)
    with processes(worker), Client(settings=fan) as client:
        worker.wait_ready()
        run_id = client.start(fanout.mapped, {"items": list(range(200)), "max_concurrency": 10})
        run = client.wait_for(run_id, timeout=240)
    assert run.status == "completed", run.error
    assert run.output["squares"] == [i * i for i in range(200)]
    assert db.execute("SELECT max(n) FROM inflight").fetchone() == (10,)


def test_branch_worker_killed_mid_branch_loses_no_result(settings, app, db, tmp_path):
    # Given worker A running branch 2 of 4 slowly (its first attempt sleeps)
    fan = settings.model_copy(update={"workflows": FANOUT.split(",")})
    a = WorkerProcess(fan, tmp_path, name="a", concurrency=1)
    with processes(a), Client(settings=fan) as client:
        a.wait_ready()
        run_id = client.start(fanout.parallel, {"width": 4, "slow_index": 2, "sleep": 30})
        eventually(
            lambda: db.execute(
                "SELECT 1 FROM lf_branches WHERE idx = 2 AND status = 'running'"
            ).fetchone(),
            timeout=30,
            message="branch 2 running on A",
        )
        # When A is killed with SIGKILL and B plus a beat take over
        a.kill()
        b = WorkerProcess(fan, tmp_path, name="b", concurrency=2)
        beat = BeatProcess(fan, tmp_path)
        with processes(b, beat):
            b.wait_ready()
            run = client.wait_for(run_id, timeout=60)
    # Then the join ran once with every result; branch 2 ran twice, counted once
    assert run.status == "completed", run.error
    assert run.output["results"] == [{"index": i, "label": "ctx"} for i in range(4)]
    assert db.execute("SELECT done, failed, status FROM lf_groups").fetchone() == (4, 0, "joined")
    assert db.execute("SELECT attempt FROM lf_branches WHERE idx = 2").fetchone() == (2,)
    assert [s.state for s in run.steps if s.outcome != "lease_expired"] == ["fork", "joined"]
