"""The chaos harness: a private Redis, real ``celery worker`` and ``celery beat``
processes on the test database, a mix of runs in flight, one fault, the invariants.

A scenario (:func:`run_scenario`) goes:

1. start a private ``redis-server`` (no persistence, a free port), one beat and two
   prefork workers (``-c 2``) with short leases (TTL 2 s, heartbeat, reaper and
   dispatcher every 0.5 s, dispatch timeout 3 s), after the fault's own ``settings``
   (e.g. a short statement timeout, or RabbitMQ as the broker);
2. submit a batch of runs of the mix of ``tests/chaos/workflows.py`` (plus the
   fault's ``mix``: runs steered to fail, whose expected error code is noted);
3. per round: wait (polling, with a deadline) until the fault's trigger holds, e.g.
   a worker has just claimed a slow state; inject the fault; let it last
   ``hold_s``; heal it; submit the next batch (the long profile has many rounds);
4. wait for quiescence: every submitted run terminal (polling, with a deadline);
   for a zombie fault, also for the late commit of each worker it struck to be refused;
5. stop every process, then check :data:`tests.chaos.invariants.INVARIANTS` by SQL.

The database is a clone of the migrated template on the shared server, or, for a
fault that stops the server (F-8), a private cluster (:func:`private_postgres`).

Nothing waits with a bare sleep; the only sleeps make a fault last (SIGSTOP past
the lease TTL, Redis down for a second) or pace the long profile's rounds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.types.json import Jsonb

from leaseflow import local
from leaseflow.client import Client
from leaseflow.settings import Settings
from tests.chaos import invariants, workflows
from tests.helpers import (
    BeatProcess,
    WorkerProcess,
    _Subprocess,
    eventually,
    kill_leaked,
    leaked_processes,
    stop_together,
)

if TYPE_CHECKING:
    from tests.chaos.faults import Fault

LEASE_TTL = 2.0
QUEUE = "chaos"  # and the private Redis's port: a queue of its own on a shared broker
WORKFLOW_MODULE = "tests.chaos.workflows"
#: Lines worth showing when an invariant fails (the tail of each process's log).
NOTABLE = (
    "action=lease_lost",
    "action=lease_reaped",
    "action=run_redispatched",
    "action=lease_expired_in_heartbeat",
    "fault point",
    "ERROR",
    "Traceback",
)


# -- profiles --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """How hard a scenario pushes: ``runs`` per fault over ``rounds`` injections."""

    name: str
    runs: int
    rounds: int
    gap_s: float  # pause between two rounds (the long profile: a fault every few seconds)
    quiesce_s: float  # deadline for every run to end after the last heal
    timeout_s: float  # per test (pytest-timeout)


PROFILES = {
    "quick": Profile("quick", runs=30, rounds=1, gap_s=0.0, quiesce_s=90.0, timeout_s=240.0),
    "long": Profile("long", runs=120, rounds=6, gap_s=3.0, quiesce_s=240.0, timeout_s=900.0),
}


def current_profile() -> Profile:
    name = os.environ.get("LEASEFLOW_CHAOS_PROFILE", "quick")
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"LEASEFLOW_CHAOS_PROFILE={name!r}: one of {sorted(PROFILES)}") from None


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer(_Subprocess):
    """A private ``redis-server`` without persistence; the shared one is never touched."""

    def __init__(self, port: int, log_dir: Path, *, name: str = "redis") -> None:
        self.name = name
        self.port = port
        self.log_path = log_dir / f"{name}.log"
        cmd = [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ]
        self._spawn(cmd, dict(os.environ))

    def members(self) -> list[tuple[int, str]]:
        """The server while it lives. Redis rewrites its process title over its
        environment, so the helpers' environment marker cannot find it; it forks no
        child (no RDB, no AOF), so its own pid is the whole family."""
        if self.proc.poll() is None and not gone(self.pid):
            return [(self.pid, f"redis-server 127.0.0.1:{self.port}")]
        return []

    def ping(self) -> bool:
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def wait_ready(self, timeout: float = 10.0) -> RedisServer:
        eventually(
            lambda: self.proc.poll() is not None or self.ping(),
            timeout=timeout,
            message=f"{self.name} answers PING",
        )
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited:\n{self.log()[-2000:]}")
        return self

    def shutdown_nosave(self) -> None:
        """``redis-cli shutdown nosave``: every queued and unacked message is gone."""
        subprocess.run(
            ["redis-cli", "-p", str(self.port), "shutdown", "nosave"],
            capture_output=True,
            timeout=10,
        )
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass(frozen=True)
class Busy:
    """A worker pool child holding a lease: the target of a process fault."""

    slot: str
    worker: WorkerProcess
    pid: int
    run_id: str
    state: str
    owner: str = ""  # its leaseflow worker id (``host:pid``), as in lf_workers
    workflow: str = ""


# -- the harness -----------------------------------------------------------------------------


class Harness:
    """One scenario's private world: Redis, workers, beats, a client and a DB connection."""

    def __init__(
        self,
        database_url: str,
        log_dir: Path,
        profile: Profile,
        *,
        workers: int = 2,
        concurrency: int = 2,
    ) -> None:
        self.database_url = database_url
        self.log_dir = log_dir
        self.profile = profile
        self.n_workers = workers
        self.concurrency = concurrency
        self.started: list[_Subprocess] = []  # everything ever started, for the cleanup
        self.workers: dict[str, WorkerProcess] = {}
        self.beats: list[BeatProcess] = []
        self.submitted: list[str] = []
        self.mix: tuple[workflows.Job, ...] = tuple(workflows.Job(wf) for wf in workflows.MIX)
        self.expected: dict[str, str] = {}  # run id -> the error code it must fail with
        self.problems: list[str] = []  # what a fault's own watch saw go wrong
        #: The lease holders a zombie fault struck (frozen, or its lease expired under
        #: it): each one's late commit must be refused (invariant I4).
        self.zombies: list[Busy] = []
        #: What a fault's inject or heal noted for its own check (e.g. signal receipts).
        self.notes: dict[str, Any] = {}
        self.round = 0  # injections so far
        self._restarts = 0
        self._mix = 0
        self.port = free_port()
        broker = f"redis://127.0.0.1:{self.port}"
        self.settings = Settings(
            database_url=database_url,
            broker_url=f"{broker}/0",
            result_backend=f"{broker}/1",  # branches run as chords
            default_queue=f"{QUEUE}-{self.port}",
            workflows=[WORKFLOW_MODULE],
            lease_ttl=LEASE_TTL,
            heartbeat_interval=0.5,
            reaper_interval=0.5,
            dispatch_interval=0.5,
            dispatch_timeout=3.0,
        )
        self.redis: RedisServer | None = None
        self.db: psycopg.Connection[Any] | None = None
        self.client: Client | None = None
        self.postgres: local.Server | None = None  # a private cluster (F-8), if any

    def open(self) -> Harness:
        """Start the private Redis; connect to the database; create ``chaos_effects``."""
        self.redis = self._start_redis()
        self.db = self.connect("chaos-harness")
        workflows.create_effects_table(self.db)
        self.client = Client(settings=self.settings)
        return self

    def connect(self, application_name: str, *, autocommit: bool = True) -> psycopg.Connection:
        """A connection of the harness's own to the test database."""
        return psycopg.connect(
            self.database_url.replace("+psycopg", ""),
            autocommit=autocommit,
            application_name=application_name,
        )

    def reconnect(self) -> None:
        """A fresh harness connection (the server dropped the old one)."""
        if self.db is not None:
            with contextlib.suppress(Exception):
                self.db.close()
        self.db = self.connect("chaos-harness")

    def reconfigure(self, **changes: Any) -> None:
        """Change settings before anything started (the client is made anew)."""
        assert not self.workers and not self.beats, "reconfigure before start()"
        self.settings = self.settings.model_copy(update=changes)
        if self.client is not None:
            self.client.close()
        self.client = Client(settings=self.settings)

    # -- processes -------------------------------------------------------------------------

    def _start_redis(self) -> RedisServer:
        server = RedisServer(self.port, self.log_dir, name=f"redis-{len(self.started)}")
        self.started.append(server)
        return server.wait_ready()

    def restart_redis(self) -> None:
        self.redis = self._start_redis()

    def start(self, *, beats: int = 1) -> Harness:
        for _ in range(beats):
            self.start_beat()
        spawned = [self._spawn_worker(f"w{i + 1}") for i in range(self.n_workers)]
        for worker in spawned:
            worker.wait_ready(timeout=60)
        return self

    def start_beat(self, settings: Settings | None = None) -> BeatProcess:
        """Another beat (``settings``: its own, e.g. another maintenance queue)."""
        beat = BeatProcess(
            settings or self.settings, self.log_dir, name=f"beat{len(self.beats) + 1}"
        )
        self.started.append(beat)
        self.beats.append(beat)
        return beat

    def _spawn_worker(
        self, slot: str, faultpoints: str = "", settings: Settings | None = None
    ) -> WorkerProcess:
        name = slot if slot not in self.workers else f"{slot}.{self._restarts}"
        worker = WorkerProcess(
            settings or self.settings,
            self.log_dir,
            name=name,
            concurrency=self.concurrency,
            faultpoints=faultpoints,
        )
        self.started.append(worker)
        self.workers[slot] = worker
        return worker

    def restart_worker(
        self, slot: str, *, faultpoints: str = "", settings: Settings | None = None
    ) -> WorkerProcess:
        """Stop the worker of ``slot`` (if still alive) and start a fresh one in its place
        (``settings``: its own, e.g. another maintenance queue)."""
        self.workers[slot].stop()
        self._restarts += 1
        return self._spawn_worker(slot, faultpoints, settings).wait_ready(timeout=60)

    def slot_of_pid(self, pid: int) -> str | None:
        for slot, worker in self.workers.items():
            if worker.proc.poll() is None and pid in worker.children():
                return slot
        return None

    def busy(
        self,
        *,
        state: str | None = None,
        fresh: float | None = None,
        workflow: str | None = None,
        data: dict[str, Any] | None = None,
        entered: bool = False,
    ) -> Busy | None:
        """A pool child holding a live run lease (in ``state`` of ``workflow``, claimed or
        handed over inline < ``fresh`` s ago, its input holding ``data``; ``entered``:
        its lock's holder has written its ``enter`` row to ``chaos_lock_ledger``)."""
        rows = self.db.execute(
            """SELECT id::text, state, lease_owner, workflow FROM lf_runs
                WHERE status = 'running' AND lease_expires_at > now()
                  AND (%(state)s::text IS NULL OR state = %(state)s)
                  AND (%(workflow)s::text IS NULL OR workflow = %(workflow)s)
                  AND (%(fresh)s::float8 IS NULL
                       OR claimed_at > now() - %(fresh)s * interval '1 second')
                  AND (%(data)s::jsonb IS NULL OR input @> %(data)s::jsonb)
                  AND (NOT %(entered)s OR EXISTS (
                       SELECT 1 FROM chaos_lock_ledger x
                        WHERE x.holder = 'run ' || lf_runs.lease_token AND x.event = 'enter'))
                ORDER BY claimed_at DESC""",
            {
                "state": state,
                "fresh": fresh,
                "workflow": workflow,
                "data": None if data is None else Jsonb(data),
                "entered": entered,
            },
        ).fetchall()
        for run_id, run_state, owner, run_workflow in rows:
            pid = int(str(owner).rsplit(":", 1)[1])
            slot = self.slot_of_pid(pid)
            if slot is not None:
                worker = self.workers[slot]
                return Busy(slot, worker, pid, run_id, run_state, str(owner), run_workflow)
        return None

    # -- runs ------------------------------------------------------------------------------

    def submit(self, n: int) -> list[str]:
        """Start ``n`` runs of the mix, in rotation; note the failures they must end in."""
        ids = []
        for _ in range(n):
            job = self.mix[self._mix % len(self.mix)]
            self._mix += 1
            run_id = self.client.start(job.wf, dict(job.input))
            if job.expect is not None:
                self.expected[run_id] = job.expect
            ids.append(run_id)
        self.submitted.extend(ids)
        return ids

    def expect(self, run_id: str, code: str) -> None:
        """``run_id`` must fail with ``code`` (a fault made sure it cannot complete)."""
        self.expected[run_id] = code

    def params(self) -> dict[str, Any]:
        """The named parameters of the invariants' queries."""
        return {
            "submitted": self.submitted,
            "budgets": invariants.budgets(),
            "expected": [f"{run_id}|{code}" for run_id, code in self.expected.items()],
            "exhausts": False,  # run_scenario sets the fault's own
            "zombies": sorted({zombie.owner for zombie in self.zombies}),
        }

    def unfinished(self) -> int:
        row = self.db.execute(
            f"""SELECT count(*) FROM unnest(%(ids)s::uuid[]) AS s(id)
                 WHERE NOT EXISTS (SELECT 1 FROM lf_runs r WHERE r.id = s.id
                                      AND r.status IN {invariants.TERMINAL!r})""",
            {"ids": self.submitted},
        ).fetchone()
        return int(row[0])

    def remember_refusals(self) -> None:
        """Copy each worker's refused commits (``lf_workers.leases_lost``) into
        ``chaos_workers_seen``: a worker process that stops cleanly forgets its row."""
        self.db.execute(
            "INSERT INTO chaos_workers_seen (id, leases_lost) "
            "SELECT id, leases_lost FROM lf_workers WHERE leases_lost > 0"
        )

    def fenced_rejections(self) -> int:
        row = self.db.execute("SELECT coalesce(sum(leases_lost), 0) FROM lf_workers")
        return int(row.fetchone()[0])

    def zombies_refused(self) -> bool:
        """Has a commit of every zombie (:attr:`zombies`) been refused?"""
        owners = sorted({zombie.owner for zombie in self.zombies})
        row = self.db.execute(
            "SELECT count(*) FROM lf_workers WHERE id = ANY(%s) AND leases_lost > 0", (owners,)
        ).fetchone()
        return bool(owners) and int(row[0]) == len(owners)

    def snapshot(self) -> tuple[datetime, list[str]]:
        """Database time now, and the runs in flight (pending or running) at that instant."""
        row = self.db.execute(
            """SELECT clock_timestamp(),
                      coalesce(array_agg(id::text) FILTER (
                          WHERE status IN ('pending', 'running')), '{}')
                 FROM lf_runs"""
        ).fetchone()
        return row[0], list(row[1])

    def recovery_s(self, at: datetime, runs: list[str]) -> float:
        """Seconds from ``at`` until every run of ``runs`` committed a step after it."""
        row = self.db.execute(
            """SELECT extract(epoch FROM max(first) - %(at)s)::float8 FROM (
                   SELECT (SELECT min(s.finished_at) FROM lf_steps s
                            WHERE s.run_id = x.id AND s.finished_at > %(at)s
                              AND s.outcome <> 'lease_expired') AS first
                     FROM unnest(%(ids)s::uuid[]) AS x(id)) q""",
            {"at": at, "ids": runs},
        ).fetchone()
        return float(row[0] or 0.0)

    # -- logs and cleanup ------------------------------------------------------------------

    def notable_lines(self, limit: int = 12) -> str:
        out = []
        for proc in self.started:
            lines = [
                line for line in proc.log().splitlines() if any(word in line for word in NOTABLE)
            ]
            if lines:
                out.append(f"--- {proc.name}: {len(lines)} notable lines, last {limit}:")
                out.extend(lines[-limit:])
        return "\n".join(out)

    def stop_all(self) -> None:
        """Warm-stop every worker and beat at once (SIGKILL after a timeout), then Redis."""
        for proc in self.started:  # a frozen Redis or worker would stall the others' stop
            for pid, _ in proc.members():
                signal_pid(pid, signal.SIGCONT)
        errors: list[BaseException] = []
        for group in (
            [p for p in self.started if not isinstance(p, RedisServer)],
            [p for p in self.started if isinstance(p, RedisServer)],
        ):
            try:
                stop_together(group)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def close(self) -> list[tuple[int, str]]:
        """Stop everything, close connections; returns the processes that had leaked."""
        try:
            self.stop_all()
        finally:
            if str(self.settings.broker_url).startswith("amqp"):
                self._drop_amqp_queues()
            if self.client is not None:
                with contextlib.suppress(Exception):
                    self.client.close()
            if self.db is not None:
                with contextlib.suppress(Exception):
                    self.db.close()
            try:
                eventually(
                    lambda: not leaked_processes(self.started),  # type: ignore[arg-type]
                    timeout=5,
                    message="every process of this scenario gone",
                )
                leaked: list[tuple[int, str]] = []
            except AssertionError:
                leaked = leaked_processes(self.started)  # type: ignore[arg-type]
            kill_leaked(self.started)  # type: ignore[arg-type]
        return leaked

    def _drop_amqp_queues(self) -> None:
        """Delete this scenario's queues and exchanges from the shared RabbitMQ."""
        from kombu import Connection

        queue = self.settings.default_queue
        with (
            contextlib.suppress(Exception),
            Connection(self.settings.broker_url, connect_timeout=5) as conn,
        ):
            for name in (queue, self.settings.maintenance_queue):
                with contextlib.suppress(Exception), conn.channel() as channel:
                    channel.queue_delete(name)
                with contextlib.suppress(Exception), conn.channel() as channel:
                    channel.exchange_delete(name)


@contextlib.contextmanager
def private_postgres(home: Path) -> Iterator[local.Server]:
    """A PostgreSQL cluster of the scenario's own, migrated (the engine's embedded
    server: ``initdb`` under ``home``, Unix socket only), for faults that stop it."""
    server = local.ensure_server(home)
    try:
        yield server
    finally:
        local.stop(home)


@contextlib.contextmanager
def harness(database_url: str, log_dir: Path, profile: Profile) -> Iterator[Harness]:
    """A :class:`Harness` whose processes are all gone afterwards, even on failure."""
    h = Harness(database_url, log_dir, profile)
    try:
        yield h.open()
    finally:
        leaked = h.close()
    if leaked:  # only when the scenario itself raised nothing: never mask its error
        raise AssertionError(f"processes outlived the scenario: {leaked}")


# -- scenarios -------------------------------------------------------------------------------


@dataclass
class Result:
    fault: str
    runs: int
    lost: int
    dup: int
    double_joins: int
    fenced_rejections: int
    recovery_s: float
    violations: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"fault={self.fault} runs={self.runs} lost={self.lost} dup={self.dup} "
            f"double_joins={self.double_joins} fenced_rejections={self.fenced_rejections} "
            f"recovery_s={self.recovery_s:.1f}"
        )

    def report(self, notable: str = "") -> str:
        parts = [self.line()]
        for name, rows in self.violations.items():
            doc = next(i.doc for i in invariants.INVARIANTS if i.name == name)
            parts.append(f"VIOLATED {name} ({doc}): {len(rows)} rows")
            parts.extend(f"    {row!r}" for row in rows[:20])
        parts.extend(f"PROBLEM {p}" for p in self.problems)
        if notable:
            parts.append(notable)
        return "\n".join(parts)


def batches(total: int, rounds: int) -> list[int]:
    """``total`` runs split over ``rounds`` submissions (the first one before round 1)."""
    base, extra = divmod(total, rounds)
    return [base + (1 if i < extra else 0) for i in range(rounds)]


def run_scenario(h: Harness, fault: Fault) -> Result:
    """Run ``fault`` against ``h`` per its profile; the result holds every violation.

    ``recovery_s`` is the longest, over the rounds, of the time (database clock) from
    the injection until every run that was in flight at that instant (pending or
    running) has committed a step after it: how long the fault delayed its victims.
    """
    profile = h.profile
    problems: list[str] = []
    if fault.settings:
        h.reconfigure(**fault.settings)
    h.mix = (h.mix if fault.standard_mix else ()) + fault.mix
    fault.prepare(h)  # e.g. rows seeded before any process starts (F-32's archive)
    h.start(beats=fault.beats)
    recoveries: list[tuple[datetime, list[str]]] = []
    for size in batches(profile.runs, max(profile.rounds, fault.min_rounds)):
        h.submit(size)
        target = eventually(
            lambda: fault.trigger(h),
            timeout=30,
            interval=0.05,
            message=f"trigger of {fault.id}",
        )
        if fault.snapshot_first:  # a slow injection, or lf_runs locked once injected
            recoveries.append(h.snapshot())
        token = fault.inject(h, target)
        if not fault.snapshot_first:
            recoveries.append(h.snapshot())
        h.round += 1
        if fault.hold_s:
            time.sleep(fault.hold_s)  # the fault lasts this long
        fault.heal(h, token)
        if profile.gap_s:
            time.sleep(profile.gap_s)  # pacing: the next fault a few seconds later
    try:
        eventually(
            lambda: h.unfinished() == 0,
            timeout=profile.quiesce_s,
            interval=0.25,
            message="every submitted run terminal",
        )
    except AssertionError as exc:
        problems.append(str(exc))  # I1 shows the stuck runs
    if fault.fenced:
        with contextlib.suppress(AssertionError):  # I4 reports a missing rejection
            eventually(h.zombies_refused, timeout=15, interval=0.25, message="zombies refused")
    problems.extend(h.problems)
    problems.extend(fault.check(h))
    h.remember_refusals()  # a worker that stops cleanly leaves the registry
    h.stop_all()  # nothing writes any more: the ledger is final
    h.remember_refusals()  # and what the stop itself refused
    params = h.params()
    params["exhausts"] = fault.exhausts
    numbers = invariants.stats(h.db, params)
    return Result(
        fault=fault.id,
        runs=len(h.submitted),
        recovery_s=max(h.recovery_s(at, runs) for at, runs in recoveries),
        violations=invariants.violations(h.db, params, fault),
        problems=problems,
        **numbers,
    )


def signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def proc_state(pid: int) -> str:
    """The state letter of ``/proc/PID/stat`` (``R``, ``S``, ``T`` stopped, ...); ``X`` gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "X"
    return stat[stat.rindex(")") + 2]


def gone(pid: int) -> bool:
    """The process is gone, or a zombie its parent has not reaped yet."""
    return proc_state(pid) in "ZX"


def stopped(worker: WorkerProcess) -> bool:
    pids = [worker.pid, *worker.children()]
    states = []
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            states.append(stat[stat.rindex(")") + 2])
    return bool(states) and all(s == "T" for s in states)
