"""Recovery paths against real PostgreSQL (and a real broker, worker and beat where a
message must travel): a branch message lost, a commit whose reply was lost (FAULTS
F-16), a definition changed under the same version, a broker down when a client
starts a run.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from leaseflow import Complete, Workflow, messages
from leaseflow.beat import jobs
from leaseflow.client import Client
from leaseflow.fsm import rules
from leaseflow.heartbeat import LeaseKeeper
from leaseflow.runner import Runner
from leaseflow.settings import Settings
from leaseflow.store import pg_runs
from leaseflow.tasks import runtime
from tests.helpers import BeatProcess, WorkerProcess, eventually, processes
from tests.integration.test_engine import drive, start
from tests.workflows import basic, fanout


def _queue_of(workflow: str, state: str) -> str:
    return "q"


def actions(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "action", None) == action]


def step_rows(db: psycopg.Connection, run_id: str) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT seq, state, attempt, outcome FROM lf_steps WHERE run_id = %s ORDER BY seq",
        (run_id,),
    ).fetchall()


# -- a branch message lost: the dispatcher re-publishes it once a probe came through --------


def test_the_dispatcher_republishes_lost_branch_messages_once_a_probe_came_through(
    client, runner, store, db
):
    # Given a fork of three branches whose messages were lost but the first one's
    first = start(client, fanout.parallel, {"width": 3})
    forked = runner.run_step(first.run_id, 1)
    assert forked.fork is not None
    group_id = forked.fork.group_id
    assert runner.handle(forked.fork.branches[0]).result == "committed"
    # and whose dispatch timeout has passed
    db.execute("UPDATE lf_branches SET redispatch_at = now() - interval '1 second'")

    # When the dispatcher runs twice (two beats) before anything came through the queue
    found = jobs.dispatch_overdue(store, _queue_of)
    again = jobs.dispatch_overdue(store, _queue_of)

    # Then it re-publishes nothing yet (they may wait in a backlog) and sends one probe
    assert (found.wakeups, again.wakeups, again.probes) == ([], [], [])
    assert [p.queue for p in found.probes] == ["q"]

    # When the probe comes through (its own call re-publishes at once), and a beat follows
    store.probe_passed("q", found.probes[0].sent_at)
    lost = jobs.dispatch_overdue(store, _queue_of, probe=False)
    after = jobs.dispatch_overdue(store, _queue_of)

    # Then the two lost branches are re-published once each, as branch messages
    assert sorted((m.group_id, m.idx, m.state) for m in lost.wakeups) == [
        (group_id, 1, "leg"),
        (group_id, 2, "leg"),
    ]
    assert all(isinstance(m, messages.BranchStep) for m in lost.wakeups)
    assert (after.wakeups, after.probes) == ([], [])

    # And running them joins the group once and completes the run
    wakeups = [w for m in lost.wakeups for w in runner.handle(m).wakeups]
    assert [(w.state, type(w).__name__) for w in wakeups] == [("joined", "JoinWake")]
    assert drive(runner, wakeups[0]) == ["committed"]
    run = client.get(first.run_id)
    assert run.status == "completed"
    assert run.output["results"] == [{"index": i, "label": "ctx"} for i in range(3)]
    assert [(s.state, s.outcome) for s in run.steps] == [("fork", "fork"), ("joined", "completed")]


# -- a commit whose reply was lost (FAULTS F-16) -------------------------------------------


def make_inline_runner(store: Any, settings: Settings) -> Runner:
    keeper = LeaseKeeper(store, worker="f16:1", ttl=settings.lease_ttl, interval=30)
    return Runner(
        store,
        keeper,
        worker="f16:1",
        ttl=settings.lease_ttl,
        limits=rules.Limits(settings.max_checkpoint_bytes),
        rand=lambda: 0.5,
    )


@pytest.fixture
def f16_runner(store, settings) -> Iterator[Runner]:
    r = make_inline_runner(store, settings)
    yield r
    r.keeper.stop()


def break_first_commit(
    monkeypatch: pytest.MonkeyPatch, db: psycopg.Connection, *, landed: bool
) -> list[int]:
    """The connection of the first fenced commit breaks: after the server committed it
    (``landed``: only its reply is lost) or before it got there. Returns the backend
    pids terminated."""
    real = pg_runs.fenced_txn
    broken: list[int] = []

    def fenced_txn(executor: Any, sql: str, params: dict[str, Any]) -> Any:
        if broken:
            return real(executor, sql, params)
        conn = executor.connection if isinstance(executor, psycopg.Cursor) else executor
        if landed:
            real(executor, sql, params)  # one autocommit statement: committed
        broken.append(conn.info.backend_pid)
        db.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        raise psycopg.OperationalError(
            "consuming input failed: server closed the connection unexpectedly"
        )

    monkeypatch.setattr(pg_runs, "fenced_txn", fenced_txn)
    return broken


@pytest.mark.parametrize("landed", [True, False], ids=["reply-lost", "not-landed"])
def test_a_commit_whose_connection_broke_counts_once_and_moves_on(
    client, f16_runner, db, monkeypatch, landed
):
    # Given the connection of s1's commit breaks: after the server committed it (its
    # reply lost), or before the commit got there
    first = start(client, basic.linear, {"n": 2})
    broken = break_first_commit(monkeypatch, db, landed=landed)

    # When s1 runs and commits
    result = f16_runner.run_step(first.run_id, 1)

    # Then the runner knows its own transition (landed) or sends it once more (not
    # landed): committed, s2 is published, no lease counted as lost
    assert len(broken) == 1
    assert result.result == "committed", result
    assert [(m.state, m.step_seq) for m in result.wakeups] == [("s2", 2)]
    assert db.execute("SELECT count(*) FROM lf_workers WHERE leases_lost > 0").fetchone() == (0,)
    # And s1 is in the step log once, and the run goes on to complete
    assert step_rows(db, first.run_id) == [(1, "s1", 1, "next")]
    assert drive(f16_runner, result.wakeups[0]) == ["committed"] * 4
    assert client.get(first.run_id).output == {"n": 2, "trail": ["s1", "s2", "s3", "s4", "s5"]}


def test_a_hand_off_whose_reply_was_lost_goes_on_inline_with_the_next_lease(
    client, f16_runner, db, monkeypatch
):
    # Given the connection of a's commit, which hands b's lease to this worker, breaks
    # after the server committed it
    first = start(client, basic.inline_chain)
    break_first_commit(monkeypatch, db, landed=True)

    # When a runs and commits
    result = f16_runner.run_step(first.run_id, 1)

    # Then the runner recognises its hand-off and runs b and c inline with their leases
    assert (result.result, result.inlined) == ("committed", 2), result
    assert [(m.state, m.step_seq) for m in result.wakeups] == [("d", 4)]
    assert step_rows(db, first.run_id) == [
        (1, "a", 1, "next"),
        (2, "b", 1, "next"),
        (3, "c", 1, "next"),
    ]
    assert db.execute("SELECT count(*) FROM lf_workers WHERE leases_lost > 0").fetchone() == (0,)


# -- a definition changed under the same version --------------------------------------------


def _morph(to: str) -> Workflow:
    """Workflow ``morph`` v1: begin -> ``to``, where ``to`` is ``left`` or ``right``."""
    wf = Workflow("morph", context=basic.Linear, register=False)

    @wf.state(initial=True, to=[to])
    def begin(ctx: Any) -> str:
        return to

    @wf.state(name=to)
    def end(ctx: Any) -> Complete:
        return Complete()

    return wf


def _edges(db: psycopg.Connection) -> list[tuple[str, str]]:
    return db.execute(
        "SELECT from_state, to_state FROM lf_transitions WHERE workflow = 'morph' AND version = 1 "
        "ORDER BY 1, 2"
    ).fetchall()


def _new_run(db: psycopg.Connection) -> str:
    row = db.execute(
        "INSERT INTO lf_runs (id, workflow, version, state, checkpoint, input) "
        "VALUES (gen_random_uuid(), 'morph', 1, 'begin', '\\x00', '{}') RETURNING id::text"
    ).fetchone()
    assert row is not None
    return str(row[0])


def test_a_definition_changed_under_the_same_version_replaces_its_edges(settings, db, caplog):
    caplog.set_level(logging.WARNING, logger="leaseflow")
    old, new = _morph("left"), _morph("right")
    # Given morph v1 registered as begin -> left
    with contextlib.closing(runtime.make_store(settings)) as store:
        store.register_workflow(old)
    assert _edges(db) == [("", "begin"), ("begin", "left")]
    assert actions(caplog, "definition_changed") == []

    # When another process registers morph v1 as begin -> right
    with contextlib.closing(runtime.make_store(settings)) as store:
        store.register_workflow(new)

    # Then it says the definition changed under the same version
    [changed] = actions(caplog, "definition_changed")
    assert (getattr(changed, "workflow", None), getattr(changed, "version", None)) == ("morph", 1)
    # And the legal edges are the new definition's, the old ones gone
    assert _edges(db) == sorted(set(new.edges())) == [("", "begin"), ("begin", "right")]
    # And the database refuses the old edge and accepts the new one
    run_id = _new_run(db)
    with pytest.raises(psycopg.errors.CheckViolation, match="illegal transition begin -> left"):
        db.execute("UPDATE lf_runs SET state = 'left' WHERE id = %s", (run_id,))
    db.execute("UPDATE lf_runs SET state = 'right' WHERE id = %s", (run_id,))

    # And registering the same definition again changes and says nothing
    with contextlib.closing(runtime.make_store(settings)) as store:
        store.register_workflow(_morph("right"))
    assert len(actions(caplog, "definition_changed")) == 1
    assert _edges(db) == [("", "begin"), ("begin", "right")]


# -- the broker down when a client starts a run ---------------------------------------------


REDIS_SERVER = ("redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(port: int) -> bool:
    import redis

    client = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@contextlib.contextmanager
def private_redis(port: int, log_dir: Path) -> Iterator[None]:
    """A ``redis-server`` of this test's own on ``port`` (no persistence)."""
    with open(log_dir / "redis.log", "wb") as log:
        proc = subprocess.Popen(
            [*REDIS_SERVER, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            eventually(
                lambda: proc.poll() is not None or answers(port),
                timeout=10,
                message="the private redis-server answers",
            )
            assert proc.poll() is None, (log_dir / "redis.log").read_text()
            yield
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_a_run_whose_first_message_could_not_be_published_is_published_by_the_dispatcher(
    settings, db, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="leaseflow")
    # Given a broker that is down (nothing listens on its port)
    port = free_port()
    down = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{port}/0"})

    # When a client starts a run
    with Client(settings=down) as client:
        run_id = client.start(basic.linear, {"n": 6})

    # Then the run exists, pending at its first state, and the failed publish was logged
    row = db.execute("SELECT status, state, step_seq FROM lf_runs WHERE id = %s", (run_id,))
    assert row.fetchone() == ("pending", "s1", 1)
    [failed] = actions(caplog, "publish_failed")
    assert getattr(failed, "runs", None) == 1

    # When the broker comes up with a worker and a beat
    with private_redis(port, tmp_path):
        worker = WorkerProcess(down, tmp_path)
        beat = BeatProcess(down, tmp_path)
        with processes(worker, beat), Client(settings=down) as client:
            worker.wait_ready()
            run = client.wait_for(run_id, timeout=60)

            # Then the dispatcher published the run's first step, and the run completed
            assert run.status == "completed", run
            assert run.output == {"n": 6, "trail": ["s1", "s2", "s3", "s4", "s5"]}
            assert f"action=run_redispatched run_id={run_id} state=s1 step_seq=1" in worker.log()
    assert step_rows(db, run_id) == [
        (1, "s1", 1, "next"),
        (2, "s2", 1, "next"),
        (3, "s3", 1, "next"),
        (4, "s4", 1, "next"),
        (5, "s5", 1, "completed"),
    ]
