"""Real ``celery worker`` processes on Redis and RabbitMQ."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from leaseflow.client import Client
from leaseflow.settings import Settings
from tests.helpers import BeatProcess, WorkerProcess, broker_messages, eventually, processes
from tests.workflows import basic

RUNS = 100  # 500 state tasks shared by two worker processes


@pytest.fixture(params=["redis", "amqp"])
def broker_settings(request, settings):
    url = request.getfixturevalue("redis_url" if request.param == "redis" else "amqp_url")
    return settings.model_copy(update={"broker_url": url})


def test_100_runs_of_5_states_on_two_worker_processes(broker_settings, app, db, tmp_path):
    # Given two worker processes on the broker under test
    settings = broker_settings
    w1 = WorkerProcess(settings, tmp_path, name="w1")
    w2 = WorkerProcess(settings, tmp_path, name="w2")
    with processes(w1, w2), Client(settings=settings) as client:
        w1.wait_ready()
        w2.wait_ready()
        # When 100 runs of the 5-state workflow are started
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


def test_failures_log_loudly_and_idle_beat_ticks_quietly(settings, app, db, tmp_path, redis_url):
    # Given a worker logging at INFO, and a beat sending the reaper and the
    # dispatcher every 0.5 s
    worker = WorkerProcess(settings, tmp_path)
    beat = BeatProcess(settings, tmp_path)
    with processes(worker, beat), Client(settings=settings) as client:
        worker.wait_ready()
        # When a run fails every attempt of a state (3 attempts)
        run_id = client.start(basic.flaky, {"fail_times": 5})
        run = client.wait_for(run_id, timeout=30)

        # and the worker has consumed many idle beat ticks
        def idle_ticks_consumed() -> bool:
            sent = beat.log().count("Sending due task leaseflow-reaper")
            left = broker_messages(redis_url, settings.maintenance_queue)
            return sent >= 6 and not left

        eventually(idle_ticks_consumed, timeout=30, message="six reaper ticks consumed")
        log = worker.log()
    assert (run.status, run.error_code) == ("failed", "E-STATE-ERROR")
    lines = log.splitlines()
    # Then each retry is a WARNING line and the failed run an ERROR line, naming the
    # run, the state, the step and the exception
    retries = [line for line in lines if "action=state_retry" in line]
    assert len(retries) == 2, retries
    for attempt, line in enumerate(retries, start=1):
        assert "WARNING" in line and f"run_id={run_id} state=shaky step_seq={attempt + 1}" in line
        assert f"error=ConnectionError: transient failure on attempt {attempt}" in line
    failed = [line for line in lines if "action=run_failed" in line]
    assert len(failed) == 1 and "ERROR" in failed[0], failed
    fields = failed[0].split()  # the run's ids and more (workflow, lease token) between them
    for field in (f"run_id={run_id}", "state=shaky", "step_seq=4", "attempt=3"):
        assert field in fields, failed[0]
    assert "error_code=E-STATE-ERROR" in fields, failed[0]
    # And Celery's INFO lines of the state tasks are kept, saying what the step did
    assert "leaseflow.flaky.shaky[" in log and "succeeded in" in log
    assert "'committed: retry'" in log and "'committed: failed'" in log
    # And no line at all about the idle beat ticks
    assert "leaseflow.beat.reap[" not in log and "leaseflow.beat.dispatch[" not in log


def test_queued_beat_ticks_expire_and_are_discarded_unrun(settings, app, store, redis_url):
    from celery import signals
    from celery.contrib.testing.worker import start_worker

    from leaseflow.beat import tasks as beat_tasks

    # Given ten reaper ticks queued as beat sends them, while no worker consumes them
    options = beat_tasks.schedule(settings)["leaseflow-reaper"]["options"]
    assert options["queue"] == settings.maintenance_queue
    for _ in range(10):
        app.send_task(beat_tasks.REAP_TASK, **options)
    queued = broker_messages(redis_url, settings.maintenance_queue)
    assert len(queued) == 10
    # and a run whose lease has expired (a reap that ran would requeue it)
    with Client(settings=settings, app=app) as client:
        run_id = client.start(basic.linear, {"n": 1})
    assert store.claim(run_id, 1, owner="gone:1", ttl=0.001) is not None
    # When a worker starts once they have expired (two reaper periods after sending)
    expiries = broker_expiry(redis_url, settings.maintenance_queue)
    assert len(expiries) == 10 and None not in expiries, expiries
    expires_at = max(e for e in expiries if e is not None)
    eventually(lambda: datetime.now(UTC) > expires_at, timeout=10, message="ticks expired")
    discarded: list[bool] = []
    ran: list[str] = []

    def on_revoked(sender: Any = None, expired: bool = False, **_: Any) -> None:
        discarded.append(expired)

    def on_prerun(sender: Any = None, **_: Any) -> None:
        ran.append(sender.name)

    signals.task_revoked.connect(on_revoked, weak=False)
    signals.task_prerun.connect(on_prerun, weak=False)
    try:
        with start_worker(
            app,
            pool="solo",
            perform_ping_check=False,
            queues=[settings.maintenance_queue],
            shutdown_timeout=10,
        ):
            eventually(lambda: len(discarded) == 10, timeout=30, message="ten ticks discarded")
            eventually(
                lambda: not broker_messages(redis_url, settings.maintenance_queue),
                timeout=10,
                message="the beat queue empty",
            )
    finally:
        signals.task_revoked.disconnect(on_revoked)
        signals.task_prerun.disconnect(on_prerun)
    # Then every tick was discarded as expired, none ran, the expired lease is still held
    assert discarded == [True] * 10
    assert ran == []
    assert store.peek(run_id).status == "running"


def broker_expiry(redis_url: str, queue: str) -> list[datetime | None]:
    """The ``expires`` header of every message waiting in ``queue`` on Redis."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        bodies = client.lrange(queue, 0, -1)
    finally:
        client.close()
    found = [json.loads(body)["headers"].get("expires") for body in bodies]
    return [None if e is None else datetime.fromisoformat(e) for e in found]


def test_on_rabbitmq_beat_ticks_carry_a_ttl_so_the_broker_drops_them(
    settings: Settings, amqp_url: str
):
    from kombu import Connection

    from leaseflow.beat import tasks as beat_tasks
    from leaseflow.tasks import celery_app

    # Given beat's reaper entry on RabbitMQ, every 30 s
    rabbit = settings.model_copy(
        update={"broker_url": amqp_url, "reaper_interval": 30.0, "lease_ttl": 120.0}
    )
    application = celery_app.make_app(rabbit)
    queue = rabbit.maintenance_queue
    try:
        # When a tick is sent with its options
        options = beat_tasks.schedule(rabbit)["leaseflow-reaper"]["options"]
        application.send_task(beat_tasks.REAP_TASK, **options)
        # Then RabbitMQ holds it with a per-message TTL of two periods (60 s), so it
        # drops the tick itself if no worker takes it by then
        with Connection(amqp_url) as conn:
            channel = conn.default_channel
            message = eventually(
                lambda: channel.basic_get(queue=queue, no_ack=True),
                timeout=10,
                message="the tick in RabbitMQ",
            )
            assert message.properties["expiration"] == "60000"
            assert message.headers["task"] == beat_tasks.REAP_TASK
            channel.queue_delete(queue)
    finally:
        celery_app.dispose_app(application)
