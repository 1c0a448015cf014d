"""The fault catalogue of the chaos suite (``/work/shared/FAULTS.md``), as data.

A :class:`Fault` says when to strike (``trigger``: polled until it returns a target),
how (``inject``), for how long (``hold_s``) and how to heal. Adding a fault is one
entry in :data:`FAULTS`; the harness runs each entry as one scenario.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from leaseflow import errors, local, messages
from leaseflow.fsm import checkpoint
from leaseflow.tasks import dispatch
from tests.chaos import locks_faults as locks
from tests.chaos import retention_faults as retention
from tests.chaos import waits_faults as waits
from tests.chaos import workflows
from tests.chaos.harness import (
    LEASE_TTL,
    Busy,
    Harness,
    RedisServer,
    gone,
    proc_state,
    signal_pid,
    stopped,
)
from tests.conftest import AMQP_URL, _check_amqp
from tests.helpers import eventually

FAULTPOINT_KILL = "after_commit_before_enqueue=kill"


def _nothing(h: Harness, token: Any) -> None:
    return None


def _nothing_first(h: Harness) -> None:
    return None


def _no_check(h: Harness) -> list[str]:
    return []


def _runs_anywhere() -> str | None:
    return None


#: Whose slow state the default trigger waits for, by round: an inline chain first.
SLOW_TARGETS = (workflows.inline.name, workflows.slow.name)


def slow_state_claimed(h: Harness) -> Busy | None:
    """A worker that has just claimed a slow state: it is mid-state for another second.
    Rounds alternate between the inline chain's slow state and ``chaos_slow``'s."""
    return h.busy(state="slow", fresh=0.5, workflow=SLOW_TARGETS[h.round % len(SLOW_TARGETS)])


@dataclass(frozen=True)
class Fault:
    id: str
    title: str
    inject: Callable[[Harness, Any], Any]  # (harness, trigger's target) -> heal's token
    heal: Callable[[Harness, Any], None] = _nothing
    hold_s: float = 0.0  # how long the fault lasts before it is healed
    fenced: bool = False  # a zombie fault: each struck worker's commit must be refused (I4)
    beats: int = 1  # beat processes from the start
    trigger: Callable[[Harness], Any] = slow_state_claimed
    check: Callable[[Harness], list[str]] = _no_check  # extra, fault-specific problems
    xfail: str | None = None  # an engine bug this scenario reproduces (strict xfail)
    #: False: the bug shows in some runs only (timing), a non-strict xfail (F-21).
    xfail_strict: bool = True
    #: The fault takes every lease in flight past its TTL (a stall, a clock jump), so each
    #: round costs its victims an attempt: in the long profile a run hit in round after
    #: round may use up its attempts and fail E-LEASE-EXPIRED, as designed (I7).
    exhausts: bool = False
    mix: tuple[workflows.Job, ...] = ()  # runs added to the rotation of the standard mix
    settings: dict[str, Any] = field(default_factory=dict)  # overrides for this scenario
    snapshot_first: bool = False  # inject is slow, or blocks reads: snapshot just before
    unavailable: Callable[[], str | None] = _runs_anywhere  # why it cannot run here (skip)
    private_postgres: bool = False  # a cluster of its own (the fault stops the server)
    #: Rounds at least, whatever the profile: a zombie fault strikes once per slow
    #: target (:data:`SLOW_TARGETS`), so the quick profile hits a plain chain too.
    min_rounds: int = 1
    #: Submit the standard mix (``workflows.MIX``) beside ``mix``; False: ``mix`` alone
    #: (F-21: no slow state keeps the surviving worker from re-claiming at once).
    standard_mix: bool = True
    #: Done before any process starts (after ``settings``): F-32 seeds its archive.
    prepare: Callable[[Harness], None] = _nothing_first


# -- F-1, F-2, F-3: crashes and shutdowns ----------------------------------------------------


def kill_worker(h: Harness, busy: Busy) -> str:
    """``kill -9 $MAIN $(pgrep -P $MAIN)``."""
    busy.worker.kill()
    return busy.slot


def restart(h: Harness, slot: str) -> None:
    h.restart_worker(slot)


def kill_child(h: Harness, busy: Busy) -> Busy:
    signal_pid(busy.pid, signal.SIGKILL)
    eventually(lambda: gone(busy.pid), timeout=10, message=f"pool child {busy.pid} gone")
    return busy


def child_replaced(h: Harness, busy: Busy) -> None:
    """Heal of F-2: the pool has forked a replacement child."""
    eventually(
        lambda: len([p for p in busy.worker.children() if not gone(p)]) == h.concurrency,
        timeout=20,
        message=f"{busy.worker.name} back to {h.concurrency} pool children",
    )


def warm_shutdown(h: Harness, busy: Busy) -> str:
    """SIGTERM to the main process: finish the running states, then exit."""
    signal_pid(busy.worker.pid, signal.SIGTERM)
    return busy.slot


def restart_after_exit(h: Harness, slot: str) -> None:
    worker = h.workers[slot]
    eventually(
        lambda: worker.proc.poll() is not None,
        timeout=30,
        message=f"{worker.name} finished its warm shutdown",
    )
    h.restart_worker(slot)


# -- F-4: a zombie ---------------------------------------------------------------------------


def freeze(h: Harness, busy: Busy) -> Busy:
    h.zombies.append(busy)  # its late commit must be refused (I4)
    busy.worker.signal_all(signal.SIGSTOP)
    eventually(lambda: stopped(busy.worker), timeout=5, message=f"{busy.worker.name} stopped")
    return busy


def thaw(h: Harness, busy: Busy) -> None:
    busy.worker.signal_all(signal.SIGCONT)


def zombies_in_every_chain(h: Harness) -> list[str]:
    """A zombie fault struck the slow state of every target: the inline chain and the
    plain one (one task per state), each zombie named by its worker id."""
    struck = {zombie.workflow for zombie in h.zombies}
    return [f"no zombie in a run of {wf}" for wf in SLOW_TARGETS if wf not in struck]


# -- F-5: the broker loses everything ----------------------------------------------------------


def redis_down(h: Harness, busy: Any) -> None:
    h.redis.shutdown_nosave()


def redis_up(h: Harness, token: Any) -> None:
    h.restart_redis()


# -- F-6: the broker stalls, then drops every client --------------------------------------------


def redis_stall(h: Harness, busy: Any) -> int:
    """``kill -STOP`` the Redis server: every publish and consume hangs."""
    pid = h.redis.pid
    signal_pid(pid, signal.SIGSTOP)
    eventually(lambda: proc_state(pid) == "T", timeout=5, message="redis stopped")
    return pid


def redis_resume_and_kill_clients(h: Harness, pid: int) -> None:
    """``kill -CONT``, then ``CLIENT KILL TYPE normal``: every worker and beat reconnects."""
    signal_pid(pid, signal.SIGCONT)
    h.redis.wait_ready()
    out = subprocess.run(
        ["redis-cli", "-p", str(h.redis.port), "CLIENT", "KILL", "TYPE", "normal"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if not out.stdout.strip().isdigit() or int(out.stdout) == 0:
        h.problems.append(f"CLIENT KILL TYPE normal killed no client: {out.stdout!r}{out.stderr!r}")


# -- F-7: database connections killed ----------------------------------------------------------


def terminate_worker_backends(h: Harness, busy: Any) -> int:
    row = h.db.execute(
        """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
            WHERE datname = current_database() AND application_name LIKE 'leaseflow-worker%'"""
    ).fetchone()
    return int(row[0])


# -- F-8: the database server goes down -----------------------------------------------------------


def postgres_down(h: Harness, busy: Any) -> None:
    """``pg_ctl stop -m fast`` of the scenario's private cluster: every connection drops."""
    local.pgctl.stop(h.postgres.pgdata)


def postgres_up(h: Harness, token: Any) -> None:
    """``pg_ctl start`` (waits until it accepts connections); the harness reconnects."""
    local.pgctl.start(h.postgres.pgdata, local.pgctl.run_as())
    h.reconnect()


# -- F-9: lock contention on the run table ------------------------------------------------------

#: F-9's workers and beat: statements give up long before the lock is released.
F9_STATEMENT_TIMEOUT_MS = 1500


def lock_runs_table(h: Harness, busy: Any) -> psycopg.Connection:
    """``LOCK TABLE lf_runs IN ACCESS EXCLUSIVE MODE`` from a connection of our own, in
    a transaction kept open: claims, commits, heartbeats and the reaper all wait."""
    conn = h.connect("chaos-locker", autocommit=False)
    conn.execute("SET LOCAL lock_timeout = '10s'")
    conn.execute("LOCK TABLE lf_runs IN ACCESS EXCLUSIVE MODE")
    return conn


def unlock_runs_table(h: Harness, conn: psycopg.Connection) -> None:
    conn.commit()
    conn.close()


def statements_timed_out(h: Harness) -> list[str]:
    """The lock outlasted the statement timeout: some worker or beat statement gave up."""
    if any("statement timeout" in p.log() for p in h.started):
        return []
    return ["no statement timed out while lf_runs was locked"]


# -- F-10: no transaction left open while a state runs -------------------------------------------

#: How long F-10 watches, and what counts as a transaction left open.
F10_WATCH_S = 3.0
F10_IDLE_S = 1.0  # idle in transaction this long (a state sleeps 1.5 s)
F10_XACT_S = 1.2  # one transaction this old, busy or not


def watch_open_transactions(h: Harness, busy: Any) -> int:
    """Sample ``pg_stat_activity`` while slow states run: a worker backend ``idle in
    transaction`` (or in one transaction for longer than a state's sleep) means a claim
    or a commit holds row locks across user code, invisible to the SKIP LOCKED reaper."""
    deadline = time.monotonic() + F10_WATCH_S
    samples = seen = 0
    offenders: dict[int, tuple[str, float, str]] = {}  # pid -> state, seconds, query
    while time.monotonic() < deadline:
        rows = h.db.execute(
            """SELECT pid, state,
                      extract(epoch FROM clock_timestamp() - state_change)::float8,
                      extract(epoch FROM clock_timestamp() - xact_start)::float8,
                      left(query, 100)
                 FROM pg_stat_activity
                WHERE datname = current_database()
                  AND application_name LIKE 'leaseflow-worker %'""",
        ).fetchall()
        samples += 1
        seen += len(rows)
        for pid, state, idle_s, xact_s, query in rows:
            idle = state.startswith("idle in transaction") and idle_s > F10_IDLE_S
            if idle or (xact_s or 0.0) > F10_XACT_S:
                worst = offenders.get(pid, ("", 0.0, ""))[1]
                offenders[pid] = (state, max(worst, round(xact_s or 0.0, 1)), query)
        time.sleep(0.05)
    if not seen:
        h.problems.append(f"F-10 saw no worker backend in {samples} samples")
    h.problems.extend(
        f"worker backend {pid} in a transaction for {age}s across a state ({state}): {query!r}"
        for pid, (state, age, query) in sorted(offenders.items())
    )
    return samples


# -- F-11: database time jumps ahead ------------------------------------------------------------


def clock_jump(h: Harness, busy: Busy) -> None:
    h.zombies.append(busy)  # mid-state past its lease: its commit must be refused (I4)
    h.db.execute(
        "UPDATE lf_runs SET lease_expires_at = now() - interval '1 second' WHERE status = 'running'"
    )
    h.db.execute(
        "UPDATE lf_branches SET lease_expires_at = now() - interval '1 second' "
        "WHERE status = 'running'"
    )


# -- F-12: duplicated messages -------------------------------------------------------------------


def duplicate_messages(h: Harness, busy: Any, copies: int = 2) -> int:
    """Publish again the current message of every active run and branch, same task id."""
    runs = h.db.execute(
        """SELECT id::text, workflow, state, step_seq FROM lf_runs
            WHERE status IN ('pending', 'running')"""
    ).fetchall()
    branches = h.db.execute(
        """SELECT b.run_id::text, r.workflow, b.state, b.group_id, b.idx
             FROM lf_branches b JOIN lf_runs r ON r.id = b.run_id
            WHERE b.status IN ('pending', 'running')"""
    ).fetchall()
    wakeups: list[messages.Message] = [
        messages.StateStep(run_id, wf, state, seq) for run_id, wf, state, seq in runs
    ]
    wakeups += [
        messages.BranchStep(run_id, wf, state, group_id, idx)
        for run_id, wf, state, group_id, idx in branches
    ]
    for _ in range(copies):
        for message in wakeups:
            dispatch.publish(h.client.app, message)
    return len(wakeups) * copies


# -- F-13: two beats ----------------------------------------------------------------------------


def second_beat_and_crash(h: Harness, busy: Busy) -> Busy:
    """Start a second beat, and SIGKILL a pool child so both reapers have an expiry."""
    h.start_beat()
    return kill_child(h, busy)


def both_beats_reaped(h: Harness) -> list[str]:
    sent = "Sending due task leaseflow-reaper"
    return [f"{b.name} never sent the reaper" for b in h.beats if sent not in b.log()]


# -- F-14, F-17, F-18: states that raise or return what cannot be stored -----------------------


def no_fault(h: Harness, target: Any) -> None:
    """The fault is in the mix itself (steered runs); nothing else is injected."""
    return None


def steered_runs(h: Harness) -> list[tuple[str, str, str, int, int]]:
    """``(run id, sabotage, state, retries, failed attempt)`` of the steered runs.

    A steered branch state counts per branch: ``retries`` is that of every completed
    branch (-1 when they differ), ``failed attempt`` the highest of the failed ones.
    """
    rows = h.db.execute(
        """SELECT r.id::text, r.input ->> 'sabotage', r.input ->> 'sabotage_at',
                  (SELECT count(*) FROM lf_steps s
                    WHERE s.run_id = r.id AND s.state = r.input ->> 'sabotage_at'
                      AND s.outcome = 'retry')
                  + (SELECT CASE WHEN count(*) = 0 THEN 0
                                 WHEN min(b.attempt) = max(b.attempt) THEN min(b.attempt) - 1
                                 ELSE -1 END
                       FROM lf_branches b
                      WHERE b.run_id = r.id AND b.status = 'completed'
                        AND b.state = r.input ->> 'sabotage_at'),
                  coalesce((SELECT max(s.attempt) FROM lf_steps s
                             WHERE s.run_id = r.id AND s.outcome = 'failed'
                               AND s.lease_token IS NOT NULL),
                           (SELECT max(b.attempt) FROM lf_branches b
                             WHERE b.run_id = r.id AND b.status = 'failed'), 0)
             FROM lf_runs r
            WHERE r.id = ANY(%(ids)s::uuid[]) AND r.input ? 'sabotage'""",
        {"ids": h.submitted},
    ).fetchall()
    return [tuple(row) for row in rows]


def raised_as_steered(h: Harness) -> list[str]:
    """F-14: a transient error is retried (twice, then success); a permanent one is not."""
    problems = []
    kinds = set()
    for run_id, how, at, retries, failed_attempt in steered_runs(h):
        kinds.add(how)
        if how == "transient" and retries != workflows.FLAKY_ATTEMPTS:
            problems.append(f"{run_id}: transient error in {at} retried {retries} times")
        if how == "permanent" and (retries or failed_attempt != 1):
            problems.append(
                f"{run_id}: permanent error in {at} retried {retries} times "
                f"(failed on attempt {failed_attempt}): the error is not retryable"
            )
    missing = {"transient", "permanent"} - kinds
    return problems + [f"no steered {kind} run" for kind in sorted(missing)] + workers_whole(h)


#: Inputs the client must refuse before creating anything (F-17).
NOT_JSON_INPUTS: tuple[dict[str, Any], ...] = (
    {"extra": datetime.now(UTC)},
    {"extra": {1, 2}},
    {"extra": b"\x00\xff"},
    {"extra": Decimal("1.5")},
    {"extra": float("nan")},
    {"extra": object()},
)


def refused_at_submit(
    h: Harness, inputs: tuple[dict[str, Any], ...], refusal: type[Exception]
) -> None:
    """Each input makes ``client.start`` raise ``refusal``, and no run is created."""
    before = h.db.execute("SELECT count(*) FROM lf_runs").fetchone()[0]
    for payload in inputs:
        try:
            run_id = h.client.start(workflows.linear, payload)
        except refusal:
            continue
        except Exception as exc:
            h.problems.append(f"start({_short(payload)}) raised {exc!r}, not {refusal.__name__}")
            continue
        h.submitted.append(run_id)  # so the invariants see it
        h.problems.append(f"start({_short(payload)}) accepted the input: run {run_id}")
    after = h.db.execute("SELECT count(*) FROM lf_runs").fetchone()[0]
    if after != before:
        h.problems.append(f"refused inputs created {after - before} runs")


def _short(payload: dict[str, Any]) -> str:
    return repr(
        {k: (v if len(repr(v)) < 40 else f"<{len(repr(v))} chars>") for k, v in payload.items()}
    )


def refuse_non_json_input(h: Harness, target: Any) -> None:
    refused_at_submit(h, NOT_JSON_INPUTS, errors.InvalidInput)


def refuse_huge_input(h: Harness, target: Any) -> None:
    refused_at_submit(h, ({"extra": "x" * workflows.HUGE},), errors.PayloadTooLarge)


def workers_whole(h: Harness) -> list[str]:
    """No worker crashed: main processes alive, no pool child lost, no encoding error."""
    problems = []
    for worker in h.workers.values():
        if worker.proc.poll() is not None:
            problems.append(f"{worker.name} exited with {worker.proc.returncode}")
        log = worker.log()
        for sign in ("WorkerLostError", "EncodeError", "MemoryError", "Traceback"):
            if sign in log:
                problems.append(f"{worker.name} logged {sign}")
    return problems


#: F-18: a pool child that handled a 3 MiB output or context stays below this peak RSS.
RSS_LIMIT_MB = 400


def workers_whole_and_small(h: Harness) -> list[str]:
    problems = workers_whole(h)
    for worker in h.workers.values():
        for pid in worker.children():
            peak = _peak_rss_mb(pid)
            if peak > RSS_LIMIT_MB:
                problems.append(f"{worker.name} child {pid} peaked at {peak} MiB")
    return problems


def _peak_rss_mb(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


# -- F-15: checkpoints damaged in the database --------------------------------------------------

#: One byte in the middle of the checkpoint, every bit of it flipped (``#``: XOR).
FLIP_MIDDLE_BYTE = (
    "checkpoint = set_byte(checkpoint, length(checkpoint) / 2,"
    " get_byte(checkpoint, length(checkpoint) / 2) # 255)"
)


@dataclass(frozen=True)
class Damage:
    """A damage done to one pending run's row, and how its next claim must fail."""

    kind: str
    change: str  # the SET clause
    code: str  # the error code the run must fail with
    says: str  # what its error must say
    codec: int | None = None  # only a run whose checkpoint has this codec byte (None: any)


DAMAGES = (
    Damage(
        "zstd byte flipped",
        FLIP_MIDDLE_BYTE,
        errors.CHECKPOINT_CORRUPT,
        "fails its checksum",
        codec=checkpoint.ZSTD,
    ),
    Damage(
        "raw byte flipped",
        FLIP_MIDDLE_BYTE,
        errors.CHECKPOINT_CORRUPT,
        "fails its checksum",
        codec=checkpoint.RAW,
    ),
    Damage(
        "unknown codec",
        "checkpoint = decode('deadbeef', 'hex')",
        errors.CHECKPOINT_CORRUPT,
        "unknown codec byte 222",
    ),
    Damage(
        "bad legacy zstd frame",  # codec 1 (written before the checksum): the frame itself
        "checkpoint = decode('01deadbeef', 'hex')",
        errors.CHECKPOINT_CORRUPT,
        "checkpoint: ",
    ),
    Damage(
        "truncated",
        "checkpoint = substring(checkpoint FROM 1 FOR length(checkpoint) / 2)",
        errors.CHECKPOINT_CORRUPT,
        "fails its checksum",
    ),
    Damage(
        "version N+1",  # a newer code's
        "context_version = context_version + 1",
        errors.CHECKPOINT_CORRUPT,
        "newer than this worker's",
    ),
    Damage(
        "version N-1",  # no upcaster
        "context_version = context_version - 1",
        errors.CHECKPOINT_STALE,
        "no upcaster goes from version",
    ),
)
#: Pending runs beyond one per damage: claims go on while the victims are picked.
SPARE_PENDING = 4


def runs_pending(h: Harness) -> bool:
    """Enough runs wait for a worker to damage one per kind of damage, among them a run
    stored under each codec a damage needs."""
    row = h.db.execute(
        """SELECT count(*), array_agg(DISTINCT get_byte(checkpoint, 0))
             FROM lf_runs WHERE status = 'pending' AND id <> ALL(%(taken)s::uuid[])""",
        {"taken": list(h.expected)},
    ).fetchone()
    codecs = set(row[1] or ())
    needed = {d.codec for d in DAMAGES if d.codec is not None}
    return int(row[0]) >= len(DAMAGES) + SPARE_PENDING and needed <= codecs


def damage_checkpoints(h: Harness, target: Any) -> list[str]:
    """Damage one pending run per kind (row-locked, so no claim runs in between), never
    one damaged before (a second damage would change the error it must fail with).
    Damages that need a codec pick their victims first."""
    damaged: list[str] = []
    for damage in sorted(DAMAGES, key=lambda d: d.codec is None):
        row = h.db.execute(
            f"""WITH victim AS (
                    SELECT id FROM lf_runs
                     WHERE status = 'pending' AND id <> ALL(%(taken)s::uuid[])
                       AND (%(codec)s::int IS NULL OR get_byte(checkpoint, 0) = %(codec)s)
                     ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED)
                UPDATE lf_runs r SET {damage.change} FROM victim WHERE r.id = victim.id
                RETURNING r.id::text""",
            {"taken": list(h.expected), "codec": damage.codec},
        ).fetchone()
        if row is None:
            h.problems.append(f"no pending run left to damage ({damage.kind})")
            continue
        damaged.append(row[0])
        h.expect(row[0], damage.code)
        h.notes.setdefault("damaged", {})[row[0]] = damage
    return damaged


def damaged_alone(h: Harness) -> list[str]:
    """F-15's own check, besides the invariants (which hold every run to its expected
    end): each damaged run failed at once with its damage's code and reason (one
    ``failed`` step, the last), and the damage touched nothing else: every run not
    damaged completed, without an error, and its last checkpoint still decodes (the
    compressed ones included). No worker crashed on the way."""
    problems = workers_whole(h)
    damaged: dict[str, Damage] = h.notes.get("damaged", {})
    if not damaged:
        return [*problems, "no checkpoint was damaged"]
    rows = h.db.execute(
        """SELECT r.id::text, r.status, r.error_code, r.error,
                  (SELECT count(*) FROM lf_steps s
                    WHERE s.run_id = r.id AND s.outcome = 'failed')
             FROM lf_runs r WHERE r.id = ANY(%s::uuid[])""",
        (list(damaged),),
    ).fetchall()
    for run_id, status, code, error, failed_steps in rows:
        damage = damaged[run_id]
        if status != "failed" or code != damage.code or damage.says not in (error or ""):
            problems.append(
                f"run {run_id} ({damage.kind}) ended {status} {code} {error!r}: "
                f"expected failed {damage.code} saying {damage.says!r}"
            )
        if failed_steps != 1:
            problems.append(f"run {run_id} ({damage.kind}) has {failed_steps} failed steps")
    rows = h.db.execute(
        """SELECT id::text, workflow, status, error_code, checkpoint FROM lf_runs
            WHERE id = ANY(%(submitted)s::uuid[]) AND id <> ALL(%(damaged)s::uuid[])""",
        {"submitted": h.submitted, "damaged": list(damaged)},
    ).fetchall()
    codecs: set[int] = set()
    for run_id, workflow, status, code, blob in rows:
        if status != "completed" or code is not None:
            problems.append(f"undamaged run {run_id} ({workflow}) ended {status} {code}")
        try:
            checkpoint.decode(blob)
        except errors.CheckpointError as exc:
            problems.append(f"undamaged run {run_id} ({workflow}): its checkpoint {exc}")
        codecs.add(blob[0])
    if len(rows) != len(h.submitted) - len(damaged):
        problems.append(f"{len(rows)} undamaged runs of {len(h.submitted) - len(damaged)}")
    if not {checkpoint.RAW, checkpoint.ZSTD} <= codecs:
        problems.append(f"the undamaged runs' checkpoints have codecs {sorted(codecs)} only")
    return problems


# -- F-22: RabbitMQ closes the connections ------------------------------------------------------

AMQP_PORT = 5672


def rabbitmq_missing() -> str | None:
    """F-22 needs the shared RabbitMQ (never stopped) and a ``rabbitmqctl`` that works."""
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl is not installed"
    try:
        _rabbitmqctl("list_connections", "pid")
    except (subprocess.SubprocessError, OSError) as exc:
        return f"rabbitmqctl does not work here: {exc}"
    _check_amqp(AMQP_URL)  # an unreachable RabbitMQ skips, or fails under CI=true
    return None


def _rabbitmqctl(*args: str) -> str:
    out = subprocess.run(
        ["rabbitmqctl", "-q", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout


def _tcp_ports_to(pids: list[int], port: int) -> set[int]:
    """Local ports of the TCP connections of ``pids`` to 127.0.0.1:``port``."""
    inodes: set[str] = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            fds = list(fd_dir.iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(remote.split(":")[1], 16) == port and inode in inodes:
            ports.add(int(local.split(":")[1], 16))
    return ports


def close_amqp_connections(h: Harness, busy: Any) -> int:
    """``rabbitmqctl close_connection`` for every connection of our workers and beat
    (never another client's): channels close, unacked messages are redelivered."""
    pids = [pid for p in h.started if not isinstance(p, RedisServer) for pid, _ in p.members()]
    ours = _tcp_ports_to(pids, AMQP_PORT)
    reason = f"chaos F-22 of {h.settings.default_queue}"
    closing = [  # all at once: one rabbitmqctl takes half a second
        subprocess.Popen(["rabbitmqctl", "-q", "close_connection", parts[0], reason])
        for parts in map(
            str.split, _rabbitmqctl("list_connections", "pid", "peer_port").splitlines()
        )
        if len(parts) == 2 and parts[1].isdigit() and int(parts[1]) in ours
    ]
    closed = sum(proc.wait(timeout=30) == 0 for proc in closing)
    if closed == 0:
        h.problems.append(f"no RabbitMQ connection of ours to close (local ports {sorted(ours)})")
    return closed


# -- F-20: killed between commit and publish ------------------------------------------------------


def arm_commit_kill(h: Harness, busy: Busy) -> str:
    """Replace the worker by one whose pool children SIGKILL themselves after a commit."""
    worker = h.restart_worker(busy.slot, faultpoints=FAULTPOINT_KILL)
    worker.wait_log(f"fault point {FAULTPOINT_KILL.replace('=', ': ')}", timeout=30)
    return busy.slot


def commit_kill_fired(h: Harness) -> list[str]:
    line = f"fault point {FAULTPOINT_KILL.replace('=', ': ')}"
    if any(line in p.log() for p in h.started):
        return []
    return ["the fault point after_commit_before_enqueue never fired"]


FAULTS: dict[str, Fault] = {
    f.id: f
    for f in [
        Fault("F-1", "kill -9 of a whole worker, restarted", kill_worker, restart),
        Fault("F-2", "kill -9 of one pool child", kill_child, child_replaced),
        Fault(
            "F-3", "SIGTERM (warm shutdown) mid-state, restarted", warm_shutdown, restart_after_exit
        ),
        Fault(
            "F-4",
            "SIGSTOP past the lease TTL, then SIGCONT (zombie)",
            freeze,
            thaw,
            hold_s=LEASE_TTL * 1.5,
            fenced=True,
            min_rounds=len(SLOW_TARGETS),
            check=zombies_in_every_chain,
        ),
        Fault("F-5", "Redis restarted without persistence", redis_down, redis_up, hold_s=1.0),
        Fault(
            "F-6",
            "Redis stalled (SIGSTOP) past the lease TTL, resumed, every client killed",
            redis_stall,
            redis_resume_and_kill_clients,
            hold_s=5.0,
        ),
        Fault("F-7", "pg_terminate_backend of the worker connections", terminate_worker_backends),
        Fault(
            "F-8",
            "PostgreSQL (a private cluster) stopped -m fast past the lease TTL, restarted",
            postgres_down,
            postgres_up,
            hold_s=LEASE_TTL * 1.25,
            snapshot_first=True,
            private_postgres=True,
        ),
        Fault(
            "F-9",
            "ACCESS EXCLUSIVE lock on lf_runs past the TTL and the statement timeout",
            lock_runs_table,
            unlock_runs_table,
            hold_s=4.0,
            settings={"statement_timeout_ms": F9_STATEMENT_TIMEOUT_MS},
            snapshot_first=True,
            check=statements_timed_out,
            exhausts=True,
        ),
        Fault(
            "F-10",
            "guard: no worker transaction open while slow states run",
            watch_open_transactions,
        ),
        Fault(
            "F-11",
            "database clock jump past every lease",
            clock_jump,
            fenced=True,
            exhausts=True,
            min_rounds=len(SLOW_TARGETS),
            check=zombies_in_every_chain,
        ),
        Fault("F-12", "every in-flight message duplicated", duplicate_messages),
        Fault(
            "F-13",
            "a second beat (and a pool child killed for the reapers)",
            second_beat_and_crash,
            child_replaced,
            check=both_beats_reaped,
        ),
        Fault(
            "F-14",
            "states raise transient (retried) and permanent (fail at once) errors",
            no_fault,
            mix=workflows.RAISING,
            check=raised_as_steered,
        ),
        Fault(
            "F-15",
            "checkpoints of pending runs corrupted (a byte flipped in a zstd and in a raw "
            "one, a bad codec byte, a bad legacy zstd frame), truncated, version N+1 and N-1",
            damage_checkpoints,
            trigger=runs_pending,
            mix=workflows.WORDY,
            check=damaged_alone,
        ),
        Fault(
            "F-17",
            "non-JSON input refused; non-JSON outputs and contexts fail their runs",
            refuse_non_json_input,
            mix=workflows.NOT_JSON,
            check=workers_whole,
        ),
        Fault(
            "F-18",
            "3 MiB input refused; 3 MiB outputs and contexts fail their runs",
            refuse_huge_input,
            mix=workflows.OVERSIZED,
            check=workers_whole_and_small,
        ),
        Fault(
            "F-20",
            "after_commit_before_enqueue=kill on one worker, restarted clean",
            arm_commit_kill,
            restart,
            check=commit_kill_fired,
        ),
        Fault(
            "F-23",
            "a signal at the same instant as its wait's timeout (deadlines pulled in by SQL, "
            "signals spread across them while the sweeper fires)",
            waits.race_signal_and_timeout,
            settings={"timeout_interval": waits.RACE_SWEEP_S},
            check=waits.one_winner_per_race,
        ),
        Fault(
            "F-24",
            "the same signal id delivered three times at once and once more, before and "
            "during the Wait",
            waits.duplicate_signals,
            check=waits.delivered_once,
        ),
        Fault(
            "F-25",
            "every beat stopped while waits and timers pass their deadline, then restarted",
            waits.stop_beats_across_deadlines,
            waits.restart_beat,
            check=waits.fired_once_late,
        ),
        Fault(
            "F-26",
            "after_commit_before_enqueue@park=kill: a worker dies right after a Wait commits",
            waits.arm_wait_kill,
            waits.signal_after_the_kill,
            check=waits.resumed_after_the_kill,
        ),
        Fault(
            "F-27",
            "cancel of runs mid-state, then kill -9 of their worker before the commit",
            waits.cancel_then_kill,
            waits.restart_killed,
            check=waits.cancelled_where_they_were,
        ),
        Fault(
            "F-21",
            "a lock holder SIGSTOPped mid-state past its lease TTL and the sweep interval, "
            "then SIGCONT",
            locks.freeze_holder,
            locks.thaw_holder,
            hold_s=LEASE_TTL * 1.5 + locks.SWEEP_F21_S,
            fenced=True,
            trigger=locks.slow_holder_entered,
            mix=workflows.LOCKED,
            standard_mix=False,
            settings={"lock_sweep_interval": locks.SWEEP_F21_S},
            check=locks.frozen_holder_fenced,
        ),
        Fault(
            "F-28",
            "a lock force-released (store.force_release) while its holder's state runs",
            locks.force_release_mid_state,
            fenced=True,
            trigger=locks.slow_holder_entered,
            mix=workflows.LOCKED,
            check=locks.forced_holder_fenced,
        ),
        Fault(
            "F-29",
            "two beats' lock sweepers while abandoned locks expire one after another",
            locks.abandon_locks,
            locks.retake_after_sweep,
            beats=2,
            trigger=locks.at_once,
            mix=workflows.LOCKED,
            settings={"lock_sweep_interval": locks.SWEEP_EVERY_S},
            check=locks.two_sweepers,
        ),
        Fault(
            "F-30",
            "SIGTERM to a worker's main process with a long state in flight (grace over)",
            locks.sigterm_main,
            locks.restart_after_handback,
            trigger=locks.backlog_drained,
            settings={"shutdown_grace": locks.GRACE_S, "lease_ttl": locks.LONG_TTL},
            check=locks.handed_back,
        ),
        Fault(
            "F-31",
            "kill -9 of a worker's process group holding leases, a short dead_after",
            locks.kill_group,
            locks.restart_after_reap,
            trigger=locks.backlog_drained,
            settings={"worker_dead_after": locks.DEAD_AFTER_S, "lease_ttl": locks.LONG_TTL},
            check=locks.resumed_before_expiry,
        ),
        Fault(
            "F-32",
            "retention purging an archive beside the mix: kill -9 of the purging worker "
            "after a committed batch (fault point), then inside a batch statement",
            retention.purge_and_kill,
            retention.restart_purger,
            prepare=retention.seed,
            check=retention.purged_without_harm,
        ),
        Fault(
            "F-22",
            "RabbitMQ broker: rabbitmqctl close_connection of every worker and beat connection",
            close_amqp_connections,
            settings={"broker_url": AMQP_URL},
            snapshot_first=True,
            unavailable=rabbitmq_missing,
        ),
    ]
}
