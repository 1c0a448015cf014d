"""Crash and race tests with real ``celery worker`` (prefork) and ``celery beat``
subprocesses, the real Redis broker and real PostgreSQL.

Each test injects one fault from ``/work/shared/FAULTS.md`` at a known instant
(SIGKILL, SIGSTOP, a named fault point, two schedulers, a duplicated message) and
then checks the invariants by SQL: no run lost, each state's effect committed
once, step seqs gap-free, a reaped worker's late write refused. Nothing waits
with a bare sleep: every wait polls the database or a log with a deadline.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from leaseflow import faults
from leaseflow.settings import Settings
from tests.helpers import (
    BeatProcess,
    WorkerProcess,
    broker_messages,
    eventually,
    forget_unacked,
    kill_leaked,
    leaked_processes,
    processes,
)
from tests.workflows import basic, crash

# A hung test fails here instead of at the suite's 300 s; teardown still runs.
pytestmark = pytest.mark.timeout(90)

TERMINAL = ("completed", "failed", "cancelled", "timed_out")
SENT_REAP = "Sending due task leaseflow-reaper (leaseflow.beat.reap)"
#: How many runs one execution of the reap job re-published, from the worker's log.
REAP_RESULT = re.compile(r"leaseflow\.beat\.reap\[[^\]]+\] succeeded in \S+s: (\d+)")


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def crash_settings(settings: Settings) -> Settings:
    """The test settings, with the crash workflows loaded by the subprocesses too."""
    return settings.model_copy(update={"workflows": [*settings.workflows, "tests.workflows.crash"]})


@pytest.fixture
def effects_table(db: psycopg.Connection) -> None:
    crash.create_effects_table(db)


class Cluster:
    """Starts worker and beat subprocesses for one test; stops them all afterwards."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.started: list[WorkerProcess | BeatProcess] = []

    def worker(self, name: str, **options: Any) -> WorkerProcess:
        proc = WorkerProcess(self.settings, self.log_dir, name=name, **options)
        self.started.append(proc)
        return proc

    def beat(self, name: str = "beat") -> BeatProcess:
        proc = BeatProcess(self.settings, self.log_dir, name=name)
        self.started.append(proc)
        return proc

    def dump_logs(self) -> None:
        """Printed at teardown: pytest shows it when the test failed."""
        for proc in self.started:
            print(f"\n===== {proc.name} ({proc.log_path}) =====\n{proc.log()[-6000:]}")


@pytest.fixture
def cluster(
    crash_settings: Settings, app, tmp_path: Path, redis_url: str, queue_name: str
) -> Iterator[Cluster]:
    """Depends on ``app`` so that its processes are gone before ``app`` purges the queue."""
    c = Cluster(crash_settings, tmp_path)
    try:
        yield c
    finally:
        try:
            with processes(*c.started):
                pass
        finally:
            c.dump_logs()
            forget_unacked(redis_url, queue_name)  # what a SIGKILLed worker left unacked
            try:
                eventually(
                    lambda: not leaked_processes(c.started),
                    timeout=5,
                    message="every process of this test gone (a leak fails the test)",
                )
            finally:
                kill_leaked(c.started)


# -- SQL views of the ledger -------------------------------------------------------------


def run_row(db: psycopg.Connection, run_id: str) -> dict[str, Any]:
    with db.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "SELECT status, state, step_seq, attempt, lease_owner, lease_token::text, "
            "error_code FROM lf_runs WHERE id = %s",
            (run_id,),
        ).fetchone()
    assert row is not None, f"run {run_id} vanished"
    return row


def step_rows(db: psycopg.Connection, run_id: str) -> list[dict[str, Any]]:
    with db.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT seq, state, attempt, outcome, lease_token::text, worker "
            "FROM lf_steps WHERE run_id = %s ORDER BY seq",
            (run_id,),
        ).fetchall()


def effect_rows(db: psycopg.Connection, run_id: str) -> list[dict[str, Any]]:
    with db.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT state, attempt, lease_token::text, pid FROM crash_effects "
            "WHERE run_id = %s ORDER BY committed_at",
            (run_id,),
        ).fetchall()


def unfinished_runs(db: psycopg.Connection) -> int:
    row = db.execute("SELECT count(*) FROM lf_runs WHERE status <> ALL(%s)", (list(TERMINAL),))
    return row.fetchone()[0]


def wait_running(
    db: psycopg.Connection, run_id: str, states: tuple[str, ...], timeout: float = 15.0
) -> dict[str, Any]:
    """Wait until the run holds a lease in one of ``states``; returns its row."""

    def check() -> dict[str, Any] | None:
        row = run_row(db, run_id)
        return row if row["status"] == "running" and row["state"] in states else None

    return eventually(check, timeout=timeout, message=f"run {run_id} running in {states}")


def expired_leases(db: psycopg.Connection) -> int:
    row = db.execute(
        "SELECT count(*) FROM lf_runs WHERE status = 'running' AND lease_expires_at < now()"
    )
    return row.fetchone()[0]


def reapers_waiting(db: psycopg.Connection) -> int:
    """Reap statements (``queries.REAP``) blocked on a lock in this database."""
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query LIKE '%WITH expired AS%'"
    )
    return row.fetchone()[0]


def all_stopped(proc: WorkerProcess) -> bool:
    """Every process of the worker is in the stopped state (``T`` in /proc)."""
    pids = [proc.pid, *proc.children()]
    states = []
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        states.append(stat[stat.rindex(")") + 2])
    return all(state == "T" for state in states)


def dead(pid: int) -> bool:
    """The process is gone, or a zombie its parent has not reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def outline(steps: list[dict[str, Any]]) -> list[tuple[int, str, int, str]]:
    return [(s["seq"], s["state"], s["attempt"], s["outcome"]) for s in steps]


# -- 1. kill -9 in the middle of a state ---------------------------------------------------


#: The classic chain (one task per state) and inline continuation (begin -> work ->
#: finish in one task, each commit handing the next lease to the same worker).
CHAINS = pytest.mark.parametrize("wf", [crash.crash, crash.crash_inline], ids=["task", "inline"])


@CHAINS
def test_sigkill_mid_state_is_reaped_and_finished_once_by_another_worker(
    cluster: Cluster, client, db, effects_table, wf
):
    # Given worker A executing the slow state of a run (its first attempt would sleep 60 s)
    a = cluster.worker("a").wait_ready()
    run_id = client.start(wf, {"sleep": 60})
    lease = wait_running(db, run_id, ("work",))
    assert lease["lease_owner"] in a.worker_ids()
    assert lease["attempt"] == 1

    # When A and its pool child are killed with SIGKILL, and a beat and worker B start
    a.kill()
    beat = cluster.beat()
    b = cluster.worker("b").wait_ready()

    # Then the run completes, the killed attempt reaped once and the state re-run once
    run = client.wait_for(run_id, timeout=20)
    assert run.status == "completed", run
    assert run.output == {"done": True}
    steps = step_rows(db, run_id)
    assert outline(steps) == [
        (1, "begin", 1, "next"),
        (2, "work", 1, "lease_expired"),
        (3, "work", 2, "next"),
        (4, "finish", 1, "completed"),
    ]
    expired, redone = steps[1], steps[2]
    assert (expired["lease_token"], expired["worker"]) == (
        lease["lease_token"],
        lease["lease_owner"],
    )
    assert redone["worker"] in b.worker_ids()
    assert redone["lease_token"] != lease["lease_token"]

    # And each state's effect committed exactly once: begin was not re-run, and the
    # slow state's effect is the second attempt's, fenced by B's lease
    effects = effect_rows(db, run_id)
    assert [(e["state"], e["attempt"]) for e in effects] == [
        ("begin", 1),
        ("work", 2),
        ("finish", 1),
    ]
    assert effects[1]["lease_token"] == redone["lease_token"]
    assert unfinished_runs(db) == 0
    assert f"action=lease_reaped run_id={run_id} state=work" in b.log()
    assert SENT_REAP in beat.log()


# -- 2. SIGSTOP: the zombie's late commit is refused -----------------------------------------


@CHAINS
def test_sigstopped_worker_resumes_and_its_commit_is_rejected(
    cluster: Cluster, client, db, effects_table, wf
):
    # Given worker A in the middle of the slow state (4 s on its first attempt)
    a = cluster.worker("a").wait_ready()
    run_id = client.start(wf, {"sleep": 4})
    lease = wait_running(db, run_id, ("work",))
    zombie_token, zombie = lease["lease_token"], lease["lease_owner"]
    assert zombie in a.worker_ids()

    # When A (main process and pool child) is frozen with SIGSTOP past its lease,
    # and the reaper and worker B take the run over and finish it
    a.signal_all(signal.SIGSTOP)
    eventually(lambda: all_stopped(a), timeout=5, message="worker A stopped")
    cluster.beat()
    b = cluster.worker("b").wait_ready()
    run = client.wait_for(run_id, timeout=20)
    assert run.status == "completed", run
    assert all_stopped(a), "A ran while it should be frozen"

    # And A is thawed: it finishes its sleep and tries to commit with its old lease
    a.signal_all(signal.SIGCONT)

    # Then its commit is refused: logged as lease_lost, counted for A's pool child
    eventually(
        lambda: any(
            "action=lease_lost" in line and zombie_token in line for line in a.log().splitlines()
        ),
        timeout=15,
        message="A logs action=lease_lost for its old lease",
    )

    def leases_lost() -> int:
        row = db.execute("SELECT leases_lost FROM lf_workers WHERE id = %s", (zombie,))
        found = row.fetchone()
        return found[0] if found else 0

    assert eventually(leases_lost, timeout=10, message="lf_workers.leases_lost of A") >= 1

    # And the ledger holds B's commit only: one committed row for the state, by B
    steps = step_rows(db, run_id)
    assert outline(steps) == [
        (1, "begin", 1, "next"),
        (2, "work", 1, "lease_expired"),
        (3, "work", 2, "next"),
        (4, "finish", 1, "completed"),
    ]
    committed = [s for s in steps if s["state"] == "work" and s["outcome"] == "next"]
    assert len(committed) == 1
    assert committed[0]["worker"] in b.worker_ids()
    assert committed[0]["worker"] != zombie
    assert committed[0]["lease_token"] != zombie_token
    assert steps[1]["lease_token"] == zombie_token

    # And no effect of the zombie landed: the slow state's effect is B's, once
    effects = effect_rows(db, run_id)
    assert [(e["state"], e["attempt"]) for e in effects] == [
        ("begin", 1),
        ("work", 2),
        ("finish", 1),
    ]
    assert zombie_token not in {e["lease_token"] for e in effects}
    assert run_row(db, run_id)["status"] == "completed"
    assert unfinished_runs(db) == 0


# -- 3. killed after the commit, before the next message was published ------------------------


def test_kill_after_commit_before_enqueue_is_redispatched(
    cluster: Cluster, client, db, redis_url, queue_name
):
    # Given worker A armed to SIGKILL its pool child right after s2 commits
    a = cluster.worker("a", faultpoints="after_commit_before_enqueue@s2=kill").wait_ready()
    first_child = a.children()

    # When a linear run reaches that point
    run_id = client.start(basic.linear, {"n": 3})
    a.wait_log("fault point after_commit_before_enqueue: kill")
    eventually(lambda: all(map(dead, first_child)), timeout=10, message="A's pool child died")
    row = eventually(
        lambda: (r := run_row(db, run_id))["step_seq"] == 3 and r,
        timeout=10,
        message="s2 committed",
    )
    a.stop()

    # Then s2 committed but s3 was never published: the run waits, pending, with no
    # message for it anywhere in the broker (queued or unacked)
    assert (row["status"], row["state"], row["lease_owner"]) == ("pending", "s3", None)
    assert outline(step_rows(db, run_id)) == [(1, "s1", 1, "next"), (2, "s2", 1, "next")]
    messages = [m for m in broker_messages(redis_url, queue_name) if run_id in (m["id"] or "")]
    assert not [m for m in messages if m["task"] == "leaseflow.linear5.s3"], messages

    # And a beat and a fresh worker B (no fault point) start
    cluster.beat()
    b = cluster.worker("b").wait_ready()

    # Then the dispatcher re-publishes s3 and the run completes, every state once
    run = client.wait_for(run_id, timeout=20)
    assert run.status == "completed", run
    assert run.output == {"n": 3, "trail": ["s1", "s2", "s3", "s4", "s5"]}
    assert outline(step_rows(db, run_id)) == [
        (1, "s1", 1, "next"),
        (2, "s2", 1, "next"),
        (3, "s3", 1, "next"),
        (4, "s4", 1, "next"),
        (5, "s5", 1, "completed"),
    ]
    assert f"action=run_redispatched run_id={run_id} state=s3 step_seq=3" in b.log()
    assert unfinished_runs(db) == 0


# -- 4. two beat processes: every expiry reaped exactly once ----------------------------------


def test_two_beats_reap_each_expired_lease_exactly_once(
    cluster: Cluster, client, db, database_url, effects_table
):
    # Given four runs each holding a lease in a slow state on worker A: two in `work`
    # (three attempts allowed) and two in `fragile` (one attempt allowed)
    a = cluster.worker("a", concurrency=4).wait_ready()
    retried = [client.start(crash.crash, {"sleep": 60}) for _ in range(2)]
    doomed = [client.start(crash.crash, {"sleep": 60, "fragile": True}) for _ in range(2)]
    leases = {}
    for run_id in retried:
        leases[run_id] = wait_running(db, run_id, ("work",))
    for run_id in doomed:
        leases[run_id] = wait_running(db, run_id, ("fragile",))
    assert {lease["lease_owner"] for lease in leases.values()} <= set(a.worker_ids())

    # When A is killed and two beat schedulers plus worker B (two pool children) take
    # over, with two reap jobs made to collide: a gate holds lf_steps in SHARE mode,
    # so each reap statement waits at its start; the gate opens once two of them are
    # waiting and every lease has expired, and both run against the same rows at once
    a.kill()
    with psycopg.connect(database_url.replace("+psycopg", "")) as gate:
        gate.execute("LOCK TABLE lf_steps IN SHARE MODE")
        beats = [cluster.beat("beat1"), cluster.beat("beat2")]
        b = cluster.worker("b", concurrency=2).wait_ready()
        eventually(lambda: expired_leases(db) == len(leases), message="leases expired")
        eventually(lambda: reapers_waiting(db) >= 2, message="two reap jobs at the gate")
        gate.commit()

    # Then every run ends: retried runs complete on their second attempt, the
    # others fail cleanly with E-LEASE-EXPIRED
    eventually(lambda: unfinished_runs(db) == 0, timeout=25, message="every run finished")
    for run_id in retried:
        row = run_row(db, run_id)
        assert (row["status"], row["error_code"]) == ("completed", None)
        assert outline(step_rows(db, run_id)) == [
            (1, "begin", 1, "next"),
            (2, "work", 1, "lease_expired"),
            (3, "work", 2, "next"),
            (4, "finish", 1, "completed"),
        ]
    for run_id in doomed:
        row = run_row(db, run_id)
        assert (row["status"], row["error_code"], row["lease_token"]) == (
            "failed",
            "E-LEASE-EXPIRED",
            None,
        )
        assert outline(step_rows(db, run_id)) == [
            (1, "begin", 1, "next"),
            (2, "fragile", 1, "lease_expired"),
        ]

    # And each expiry was reaped exactly once, with the expired lease's token
    per_attempt = db.execute(
        "SELECT run_id::text, attempt, count(*), min(lease_token::text) FROM lf_steps "
        "WHERE outcome = 'lease_expired' GROUP BY run_id, attempt"
    ).fetchall()
    assert sorted(per_attempt) == sorted(
        (run_id, 1, 1, lease["lease_token"]) for run_id, lease in leases.items()
    )
    total = db.execute("SELECT count(*) FROM lf_steps WHERE outcome = 'lease_expired'")
    assert total.fetchone()[0] == len(leases)
    reaped_lines = [line for line in b.log().splitlines() if "action=lease_reaped" in line]
    assert len(reaped_lines) == len(leases), reaped_lines
    requeued = [int(n) for n in REAP_RESULT.findall(b.log())]  # runs each job re-published
    assert sum(requeued) == len(retried), requeued

    # And no state's effect committed twice
    dup = db.execute(
        "SELECT run_id, state FROM crash_effects GROUP BY 1, 2 HAVING count(*) > 1"
    ).fetchall()
    assert dup == []

    # And both schedulers were really running and sending the reaper
    for beat in beats:
        assert beat.proc.poll() is None, f"{beat.name} exited"
        assert SENT_REAP in beat.log(), f"{beat.name} did not send the reaper"


# -- 5. the same message delivered twice ---------------------------------------------------


def test_duplicate_message_executes_the_step_once(
    client, app, settings: Settings, inline_worker, db, caplog
):
    # Given a worker (two threads) whose first claim of s1 holds its lease until the
    # duplicate message has been refused, so the duplicate arrives mid-step. This
    # test's database holds one run only, so matching on the state is enough (the
    # first claim may come before client.start has returned the run id).
    caplog.set_level(logging.DEBUG, logger="leaseflow")
    skipped: list[logging.LogRecord] = []
    claims: list[dict[str, object]] = []
    refused = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "action", None) == "claim_skipped":
                skipped.append(record)
                refused.set()

    def hold_first_claim(info: dict[str, object]) -> None:
        if info.get("state") != "s1":
            return
        claims.append(dict(info))
        if len(claims) == 1:
            refused.wait(15)
        else:  # the duplicate claimed too: let both go on, the assertions tell
            refused.set()

    def redeliver_s1(run_id: str) -> None:
        app.send_task(
            "leaseflow.linear5.s1",
            args=(run_id, 1),
            task_id=f"{run_id}:1",  # the very id dispatch gave the first message
            queue=settings.default_queue,
        )

    watch = Watch(level=logging.DEBUG)
    logging.getLogger("leaseflow").addHandler(watch)
    faults.arm("after_claim", hold_first_claim)
    try:
        # When the run starts and its first message is delivered a second time
        run_id = client.start(basic.linear, {"n": 5})
        redeliver_s1(run_id)
        eventually(refused.is_set, timeout=15, message="the duplicate handled")
        assert len(claims) == 1, f"s1 was claimed twice: {claims}"
        done = client.wait_for(run_id, timeout=20)

        # And once more after the run has finished (a late redelivery)
        redeliver_s1(run_id)
        eventually(lambda: len(skipped) >= 2, timeout=10, message="late duplicate refused")
    finally:
        faults.disarm("after_claim")
        logging.getLogger("leaseflow").removeHandler(watch)

    # Then s1 ran once: the duplicates claimed nothing (run running, then completed)
    assert len(claims) == 1, claims
    assert done.status == "completed", done
    assert done.output == {"n": 5, "trail": ["s1", "s2", "s3", "s4", "s5"]}
    assert [(r.run_id, r.step_seq, r.status) for r in skipped] == [
        (run_id, 1, "running"),
        (run_id, 1, "completed"),
    ]
    assert outline(step_rows(db, run_id)) == [
        (1, "s1", 1, "next"),
        (2, "s2", 1, "next"),
        (3, "s3", 1, "next"),
        (4, "s4", 1, "next"),
        (5, "s5", 1, "completed"),
    ]


# -- 6. database time jumps past a live lease (FAULTS F-11) -----------------------------------


def test_database_clock_jump_expires_a_live_lease(cluster: Cluster, client, db, effects_table):
    # Given worker A in the middle of the slow state (3 s on its first attempt), and
    # no beat, so no reaper acts on its own
    a = cluster.worker("a").wait_ready()
    run_id = client.start(crash.crash, {"sleep": 3})
    lease = wait_running(db, run_id, ("work",))

    # When database time jumps past every lease (F-11: a lease ends by DB time only)
    db.execute(
        "UPDATE lf_runs SET lease_expires_at = now() - interval '1 second' WHERE status = 'running'"
    )

    # Then A's lease is over: its next heartbeat cannot revive it and its commit is
    # refused, as for a zombie (F-4)
    def a_done() -> str | None:
        if any(s["lease_token"] == lease["lease_token"] for s in step_rows(db, run_id)):
            return "committed"
        return "refused" if "action=lease_lost" in a.log() else None

    assert eventually(a_done, timeout=15, message="A's attempt ended") == "refused"

    # And a reaper hands the run on: it completes on the second attempt
    cluster.beat()
    run = client.wait_for(run_id, timeout=20)
    assert outline(step_rows(db, run_id)) == [
        (1, "begin", 1, "next"),
        (2, "work", 1, "lease_expired"),
        (3, "work", 2, "next"),
        (4, "finish", 1, "completed"),
    ]
    assert run.status == "completed", run
