"""W1 linear throughput (backlog drain): leaseflow vs the stock Celery chain a user
runs vs a "naive durable" Celery chain, 5 no-op states per run.

Each system is drained by its own real ``celery worker`` subprocess (prefork -c 2,
JSON, acks_late, prefetch 1, no result backend) on the same Redis server and scratch db,
back to back (the order rotated every round). For each system and round: all runs are
enqueued first, then the worker is started; it is stopped once every run is finished.

  plain         the reference of every ratio: the stock chain ``chain(noop.si() x 4,
                last.si())`` (``benchmarks/chains.py``), Celery's defaults except
                ``acks_late``, prefetch 1 and no result backend; task events off; nothing
                in the tasks but the no-op, except that ``last`` records its end and
                counts the run done (one pipelined Redis round trip per run).
  plain_events  the same with task events on both sides (``worker_send_task_events``
                and ``task_send_sent_event``): Celery as Flower needs it.
  plain_reuse   (on demand) ``plain`` with every kombu Redis channel reusing one client
                per pool, as leaseflow's workers do (``ReuseRedisClients``); with events
                off it mostly measures nothing any more, so it is not run by default.
  leaseflow     ``benchmarks/workflows.py`` ``linear_bench``: s1 -> s2 -> s3 -> s4 -> s5
                -> Complete, on a fresh migrated database; runs started with ``Client``;
                the worker with leaseflow's default task events (printed at the start).
  leaseflow_events  the same worker run with ``-E`` (as ``leaseflow worker -E``): task
                events on, whatever the default.
  leaseflow_inline  the same five states with s2..s5 declared ``inline=True``: the
                commit of each state hands the next one's lease to the same task (inline
                continuation), so a run is one Celery task and one statement per state.
  leaseflow_locked  (on demand) ``lock="bench:{key}"`` on every state, a key per run:
                each claim takes an uncontended lock in its transaction, each commit
                frees it; ``leaseflow_contended`` the same with every run on two keys.
  leaseflow_ref the default mode on the code of ``--ref <commit>`` (a git worktree on the
                worker's PYTHONPATH): ``--systems leaseflow,leaseflow_ref,plain --ref X``
                is the A/B of a change, old and new code in one run;
                ``leaseflow_inline_ref`` likewise for ``leaseflow_inline``.
  leaseflow_hooks  (on demand) ``leaseflow`` with ``benchmarks/hooks_bench.py``: a hook
                that raises after every transition, one that sleeps 5 s after every
                finished run (issue 21: hooks must not slow W1 by more than 5 %).
  leaseflow_nometrics  (on demand) ``leaseflow`` with ``LEASEFLOW_METRICS=off``: every
                metric call a no-op (the A/B of the metrics' overhead).
  leaseflow_served  (on demand) ``leaseflow`` with ``LEASEFLOW_METRICS_PORT`` set: the
                multiprocess mode (metrics in files, summed by the main process).
  naive         ``benchmarks/chains.py`` ``naive_step``: a bare Celery task per state over
                raw psycopg: claim UPDATE (1 commit), a lease-gated UPDATE + step INSERT
                (1 transaction), then publish the next task. Its own fresh database.
  floor         ``benchmarks/floor.py``: ONE statement per state (the fenced commit,
                which issues the next token carried in the message; no claim and no
                start check, so not a safe design): the least database work a durable
                chain with one task per state can do.

Metrics:
  states/s      states ÷ (last state end - the moment the worker took its first message),
                the same rule for every system. The start is detected from outside: the
                benchmark polls ``LLEN`` of the queue every millisecond after starting the
                worker (all runs' first messages are in it) and takes ``time.time()`` when
                it drops, so the worker's start-up is excluded and no task needs a stamp.
                The end: leaseflow ``max(lf_steps.finished_at)``, naive/floor
                ``max(finished_at)`` of their steps (database clock = the host's clock),
                plain the last ``last`` task's ``time.time()``.
  commits/state Δ ``pg_stat_database.xact_commit`` of the system's own database from just
                before the worker starts to just after it stopped (its backends exit, which
                flushes their statistics), minus the benchmark's own polling transactions,
                minus the idle rate measured for ``--idle-s`` beforehand, ÷ states.
  WAL flushes/state  Δ ``pg_stat_wal.wal_sync`` over the same window, minus the idle
                rate, ÷ states: the commits that waited for a disk flush (claims commit
                with ``synchronous_commit=off`` and are flushed by the next commit).
                ``pg_stat_wal`` is cluster-wide: run nothing else meanwhile.
  statements/state  Δ ``pg_stat_statements.calls`` when that extension is loaded
                (``shared_preload_libraries``); otherwise reported as unavailable.
  CPU ms/state  by process, from ``/proc/<pid>/stat`` (utime + stime), from the first
                message taken to the last run done, ÷ states: the worker's main process,
                its pool children, PostgreSQL (the backends of the system's own database
                plus the postmaster and the auxiliary processes: WAL writer,
                checkpointer, ...), redis-server (shared: other clients count too), and
                the client, i.e. this process while it enqueued every run (its own CPU,
                ``time.process_time()``; not the server side of the enqueue). The table
                then shows each system minus ``plain``: where the extra CPU goes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ADMIN_URL,
    ROOT,
    CeleryWorker,
    CpuMeter,
    Deadline,
    Scratch,
    ScratchDatabase,
    ScratchRedis,
    clean_env,
    fingerprint,
    fingerprint_line,
    ignoring_sigint,
    log,
    percentile,
    ratio,
    rotated,
)
from leaseflow.tasks import dispatch

HELP = "W1: leaseflow 5-state runs vs plain Celery chain vs naive durable chain"

STATES = 5
PROFILES = {"full": 2000, "quick": 300}
SYSTEMS = (
    "leaseflow",
    "leaseflow_events",
    "leaseflow_inline",
    "leaseflow_locked",
    "leaseflow_contended",
    "leaseflow_hooks",
    "leaseflow_nometrics",
    "leaseflow_served",
    "leaseflow_ref",
    "leaseflow_inline_ref",
    "naive",
    "floor",
    "plain",
    "plain_events",
    "plain_reuse",
)
#: Run by default: the ``_ref`` systems need ``--ref``; ``plain_reuse``, the locked
#: systems and the observability A/Bs are on demand.
ON_DEMAND = ("_ref", "_reuse", "_locked", "_contended", "_hooks", "_nometrics", "_served")
DEFAULT_SYSTEMS = tuple(s for s in SYSTEMS if not s.endswith(ON_DEMAND))
#: The reference of every ratio, then the further pairs.
REFERENCE = "plain"
PAIRS = (
    *((s, REFERENCE) for s in SYSTEMS if s != REFERENCE),
    ("leaseflow", "leaseflow_ref"),
    ("leaseflow_inline", "leaseflow_inline_ref"),
    ("leaseflow_events", "plain_events"),
    ("leaseflow", "naive"),
    ("leaseflow_hooks", "leaseflow"),
    ("leaseflow", "leaseflow_nometrics"),
    ("leaseflow_served", "leaseflow_nometrics"),
)
#: CPU components of a state (``total`` is the sum of the others).
CPU_PARTS = ("worker_main", "worker_pool", "postgres", "redis", "client", "total")
#: The rows of the CPU-per-state difference table (system minus ``plain``).
CPU_DELTAS = (
    "leaseflow",
    "leaseflow_events",
    "leaseflow_inline",
    "leaseflow_hooks",
    "leaseflow_nometrics",
    "leaseflow_served",
    "naive",
    "plain_events",
)


def _systems(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown systems {unknown}; choose from {SYSTEMS}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, help="runs per system and round (full 2000, quick 300)")
    p.add_argument("--quick", action="store_true", help="quick profile: 300 runs, 1 round")
    p.add_argument("--rounds", type=int, default=1, help="rounds (order rotated); default 1")
    p.add_argument(
        "--systems", type=_systems, default=list(DEFAULT_SYSTEMS), help=",".join(SYSTEMS)
    )
    p.add_argument(
        "--ref",
        help="a git commit whose leaseflow the leaseflow_ref system runs (the A/B of a "
        "change: old and new code in one run, same databases, same Redis)",
    )
    p.add_argument("--concurrency", type=int, default=2, help="worker -c (default 2)")
    p.add_argument("--pool", default="prefork", help="worker -P (default prefork)")
    p.add_argument("--idle-s", type=float, default=3.0, help="idle-rate window before a drain")
    p.add_argument("--redis-db", type=int, help="Redis db to use (default: a free one, 15..1)")
    p.add_argument("--loglevel", default="WARNING", help="worker -l (default WARNING)")
    p.add_argument("--budget", type=float, default=900.0, help="give up after this many s")


# -- database statistics ---------------------------------------------------------------


def _xact_commit(dbname: str) -> int:
    import psycopg

    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (dbname,)
        ).fetchone()
    return int(row[0]) if row else 0


def _wal_syncs() -> int:
    """The cluster's WAL flushes so far (``pg_stat_wal.wal_sync``, PostgreSQL 14+)."""
    import psycopg

    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        row = conn.execute("SELECT wal_sync FROM pg_stat_wal").fetchone()
    return int(row[0]) if row else 0


def _statements(url: str) -> int | None:
    """Total ``pg_stat_statements.calls`` of this database, or None if unavailable."""
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT sum(calls) FROM pg_stat_statements s JOIN pg_database d "
                "ON d.oid = s.dbid WHERE d.datname = current_database()"
            ).fetchone()
            return int(row[0] or 0)
    except psycopg.Error:
        return None


def pg_stat_statements_status() -> str:
    import psycopg

    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        libs = conn.execute("SHOW shared_preload_libraries").fetchone()
        avail = conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'pg_stat_statements'"
        ).fetchone()
    if libs and "pg_stat_statements" in libs[0]:
        return "loaded"
    if avail:
        return "installed but not in shared_preload_libraries: statements/state unavailable"
    return "not installed: statements/state unavailable"


# -- the systems ---------------------------------------------------------------------------


class Drain:
    """One system's drain: enqueue, idle window, worker, wait, stop, figures."""

    name: str
    #: extra ``celery worker`` options (``-E`` for the events rows)
    worker_options: tuple[str, ...] = ()

    def __init__(self, scratch: Scratch, redis: ScratchRedis, args: Any, tag: str) -> None:
        self.scratch = scratch
        self.redis = redis
        self.args = args
        self.queue = f"lfbench-{self.name}-{redis.token}-{tag}"
        self.db: ScratchDatabase | None = None
        self.polls = 0

    def worker(self, app: str, env: dict[str, str], cwd: Path = ROOT) -> CeleryWorker:
        return self.scratch.worker(
            app,
            name=f"{self.name}-{self.queue[-4:]}",
            queue=self.queue,
            env=env,
            args=self.args,
            extra=self.worker_options,
            cwd=cwd,
        )

    def new_db(self) -> ScratchDatabase:
        db = ScratchDatabase()
        self.scratch.defer(f"drop database {db.name}", db.drop)
        self.db = db
        return db

    def enqueue(self, runs: int) -> None:
        raise NotImplementedError

    def start_worker(self) -> CeleryWorker:
        raise NotImplementedError

    def done(self) -> int:
        raise NotImplementedError

    def finish(self) -> tuple[int, float | None]:
        """``(states, the last state's end as a Unix time)``, once drained."""
        raise NotImplementedError

    def queued(self) -> int:
        """Messages waiting in the queue: leaseflow's carry a priority, and on Redis
        kombu keeps one list per priority step (stock Celery's use the first)."""
        with self.redis.client.pipeline(transaction=False) as pipe:
            for key in dispatch.redis_queue_keys(self.queue):
                pipe.llen(key)
            return sum(int(n) for n in pipe.execute())

    def wait_consuming(self, worker: CeleryWorker, queued: int, deadline: Deadline) -> float:
        """The Unix time at which the worker took its first message: polled from outside
        (``LLEN`` of the queue every millisecond), the same for every system."""
        for i in range(10_000_000):
            if self.queued() < queued:
                return time.time()
            if i % 200 == 0:
                worker.check()
                deadline.check()
            time.sleep(0.001)
        raise RuntimeError(f"{self.name}: the worker never consumed")

    def run(self, runs: int, deadline: Deadline) -> dict[str, Any]:
        t0, cpu0 = time.monotonic(), time.process_time()
        self.enqueue(runs)
        enqueue_s = time.monotonic() - t0
        client_cpu = time.process_time() - cpu0
        queued = self.queued()
        if queued != runs:
            raise RuntimeError(f"{self.name}: {queued} messages in {self.queue}, not {runs}")
        idle = None
        stmts0 = None
        if self.db is not None:
            c0, w0 = _xact_commit(self.db.name), _wal_syncs()
            time.sleep(self.args.idle_s)
            c1, w1 = _xact_commit(self.db.name), _wal_syncs()
            idle = max(0, c1 - c0) / self.args.idle_s
            idle_wal = max(0, w1 - w0) / self.args.idle_s
            stmts0 = _statements(self.db.url)
        log(f"{self.name}: {runs} runs enqueued in {enqueue_s:.1f}s; starting the worker")
        started = time.monotonic()
        worker = self.start_worker()
        meter = CpuMeter(worker.members, worker.proc.pid, self.db.name if self.db else None)
        consuming = self.wait_consuming(worker, queued, deadline)
        meter.start()  # the worker is up: its start-up CPU is not counted
        for _ in range(100_000):
            if self.done() >= runs:
                break
            worker.check()
            deadline.check()
            time.sleep(0.2)
        drain_wall = time.monotonic() - started
        cpu = meter.stop()
        worker.stop()
        c2 = None
        if self.db is not None:
            import psycopg

            self.conn.close()  # its polls' statistics are flushed when the backend exits
            time.sleep(0.6)  # the exited backends' statistics reach pg_stat_database
            c2, w2 = _xact_commit(self.db.name), _wal_syncs()
            stmts1 = _statements(self.db.url) if stmts0 is not None else None
            self.conn = psycopg.connect(self.db.url, autocommit=True)
            self.scratch.defer("close connection", self.conn.close)
        states, end = self.finish()
        span_s = None if end is None else end - consuming
        out: dict[str, Any] = {
            "runs": runs,
            "states": states,
            "enqueue_s": round(enqueue_s, 2),
            "drain_s": None if span_s is None else round(span_s, 3),
            "states_per_s": round(states / span_s, 1) if span_s else None,
            "runs_per_s": round(states / STATES / span_s, 1) if span_s else None,
            "worker_wall_s": round(drain_wall, 2),
        }
        if states:
            cpu["client"] = client_cpu
            per = {k: round(v * 1000 / states, 3) for k, v in cpu.items()}
            per["total"] = round(sum(per[k] for k in CPU_PARTS[:-1]), 3)
            out["cpu_ms_per_state"] = per
        if c2 is not None:
            delta = c2 - c1 - self.polls
            idle_part = (idle or 0.0) * drain_wall
            out["xact_commit_delta"] = c2 - c1
            out["benchmark_polls"] = self.polls
            out["idle_commits_per_s"] = round(idle or 0.0, 2)
            out["commits_per_state"] = round((delta - idle_part) / states, 3) if states else None
            out["wal_sync_delta"] = w2 - w1
            out["wal_flushes_per_state"] = (
                round((w2 - w1 - idle_wal * drain_wall) / states, 3) if states else None
            )
            out["statements_per_state"] = (
                round((stmts1 - stmts0 - self.polls) / states, 3)
                if stmts0 is not None and stmts1 is not None and states
                else None
            )
        return out


class LeaseflowDrain(Drain):
    name = "leaseflow"
    inline = False

    def enqueue(self, runs: int) -> None:
        import psycopg

        from leaseflow.client import Client
        from leaseflow.settings import Settings

        db = self.new_db()
        self.migrate(db)
        settings = Settings(
            database_url=db.sqlalchemy_url,
            broker_url=self.redis.url,
            default_queue=self.queue,
            workflows=["benchmarks.workflows"],
        )
        self.env = clean_env(
            LEASEFLOW_DATABASE_URL=db.sqlalchemy_url,
            LEASEFLOW_BROKER_URL=self.redis.url,
            LEASEFLOW_DEFAULT_QUEUE=self.queue,
            LEASEFLOW_WORKFLOWS="benchmarks.workflows",
        )
        client = Client(settings=settings)
        try:
            for i in range(runs):
                wf, data = self.run_of(i)
                client.start(wf, data)
        finally:
            client.close()
        self.conn = psycopg.connect(db.url, autocommit=True)
        self.scratch.defer("close connection", self.conn.close)

    def migrate(self, db: ScratchDatabase) -> None:
        db.migrate()

    def run_of(self, i: int) -> tuple[Any, dict[str, Any]]:
        """The workflow and input of run ``i``."""
        from benchmarks import workflows

        return (workflows.linear_inline_bench if self.inline else workflows.linear_bench), {}

    def start_worker(self) -> CeleryWorker:
        return self.worker("leaseflow.tasks", self.env)

    def done(self) -> int:
        self.polls += 1
        row = self.conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'completed'),"
            " count(*) FILTER (WHERE status NOT IN ('pending', 'running', 'completed'))"
            " FROM lf_runs"
        ).fetchone()
        if row[1]:
            raise RuntimeError(f"leaseflow: {row[1]} runs ended other than completed")
        return int(row[0])

    def finish(self) -> tuple[int, float | None]:
        row = self.conn.execute(
            "SELECT count(*), extract(epoch FROM max(finished_at))::float8"
            " FROM lf_steps WHERE outcome <> 'lease_expired'"
        ).fetchone()
        return int(row[0]), row[1]


class LeaseflowRefDrain(LeaseflowDrain):
    """The default mode on the code of ``--ref``: its worker imports leaseflow from a
    git worktree of that commit, and its runs are created by that commit's own client
    (a subprocess on the worktree), so their checkpoints and messages are the ref's
    even when the format changed since. Its database is migrated by its own code."""

    name = "leaseflow_ref"

    def migrate(self, db: ScratchDatabase) -> None:
        """The ref's own migrations: its schema, as its code expects."""
        tree = ref_worktree(self.scratch, self.args.ref)
        code = "import sys; from leaseflow import migrations; migrations.upgrade(sys.argv[1])"
        subprocess.run(
            [sys.executable, "-c", code, db.sqlalchemy_url],
            env={**clean_env(), "PYTHONPATH": str(tree)}, cwd=tree, check=True,
        )  # fmt: skip
        import psycopg

        with psycopg.connect(db.url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")

    def enqueue(self, runs: int) -> None:
        super().enqueue(0)  # the database, the settings and the connection
        tree = ref_worktree(self.scratch, self.args.ref)
        code = (
            "import sys\n"
            "from benchmarks import workflows\n"
            "from leaseflow.client import Client\n"
            "wf = workflows.linear_inline_bench if sys.argv[2] == '1' else workflows.linear_bench\n"
            "with Client() as client:\n"
            "    for _ in range(int(sys.argv[1])):\n"
            "        client.start(wf, {})\n"
        )
        subprocess.run(
            [sys.executable, "-c", code, str(runs), "1" if self.inline else "0"],
            env={**self.env, "PYTHONPATH": str(tree)}, cwd=tree, check=True,
        )  # fmt: skip

    def start_worker(self) -> CeleryWorker:
        tree = ref_worktree(self.scratch, self.args.ref)
        env = {**self.env, "PYTHONPATH": str(tree)}
        imported = subprocess.run(
            [sys.executable, "-c", "import leaseflow; print(leaseflow.__file__)"],
            env=env, cwd=tree, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        if not imported.startswith(str(tree)):  # the A/B would compare the code with itself
            raise RuntimeError(f"{self.name}: the worker would import {imported}, not {tree}")
        return self.worker("leaseflow.tasks", env, cwd=tree)


class LeaseflowInlineRefDrain(LeaseflowRefDrain):
    """``leaseflow_inline`` on the code of ``--ref``."""

    name = "leaseflow_inline_ref"
    inline = True


_worktrees: dict[str, Path] = {}


def ref_worktree(scratch: Scratch, ref: str | None) -> Path:
    """A detached git worktree of ``ref`` (made once per run, removed at the end)."""
    if not ref:
        raise SystemExit("leaseflow_ref needs --ref <commit>")
    if ref not in _worktrees:
        sha = subprocess.run(
            ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        tree = Path(tempfile.mkdtemp(prefix=f"lfbench-ref-{sha[:10]}-"))
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), sha],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        scratch.defer(
            f"remove worktree {tree}",
            lambda: subprocess.run(
                ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False
            ),
        )
        log(f"leaseflow_ref: {ref} = {sha[:10]} at {tree}")
        _worktrees[ref] = tree
    return _worktrees[ref]


class LeaseflowEventsDrain(LeaseflowDrain):
    """The default mode with the worker run as ``leaseflow worker -E`` would: ``-E``."""

    name = "leaseflow_events"
    worker_options = ("-E",)


class LeaseflowInlineDrain(LeaseflowDrain):
    """The same five states declared ``inline=True``: one Celery task per run."""

    name = "leaseflow_inline"
    inline = True


class LeaseflowLockedDrain(LeaseflowDrain):
    """``lock="bench:{key}"`` on every state, a key per run: the cost of taking and
    freeing an uncontended lock in each claim and commit."""

    name = "leaseflow_locked"
    keys: int | None = None  # None: one key per run

    def run_of(self, i: int) -> tuple[Any, dict[str, Any]]:
        from benchmarks import workflows

        key = f"r{i}" if self.keys is None else f"k{i % self.keys}"
        return workflows.linear_locked_bench, {"key": key}


class LeaseflowContendedDrain(LeaseflowLockedDrain):
    """The same, all runs sharing two keys: the two worker processes contend for them."""

    name = "leaseflow_contended"
    keys = 2


class LeaseflowHooksDrain(LeaseflowDrain):
    """A raising hook after every transition, a 5 s sleeping one after every run."""

    name = "leaseflow_hooks"

    def start_worker(self) -> CeleryWorker:
        modules = "benchmarks.workflows,benchmarks.hooks_bench"
        return self.worker("leaseflow.tasks", {**self.env, "LEASEFLOW_WORKFLOWS": modules})


class LeaseflowNoMetricsDrain(LeaseflowDrain):
    """Every metric call a no-op (``LEASEFLOW_METRICS=off``)."""

    name = "leaseflow_nometrics"

    def start_worker(self) -> CeleryWorker:
        return self.worker("leaseflow.tasks", {**self.env, "LEASEFLOW_METRICS": "off"})


class LeaseflowServedDrain(LeaseflowDrain):
    """Metrics in multiprocess mode, served on a port by the worker's main process."""

    name = "leaseflow_served"

    def start_worker(self) -> CeleryWorker:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return self.worker("leaseflow.tasks", {**self.env, "LEASEFLOW_METRICS_PORT": str(port)})


class TableDrain(Drain):
    """A baseline whose runs and steps live in ``<prefix>_runs`` and ``<prefix>_steps``."""

    prefix: str

    def done(self) -> int:
        self.polls += 1
        row = self.conn.execute(
            f"SELECT count(*) FROM {self.prefix}_runs WHERE status = 'completed'"
        ).fetchone()
        return int(row[0])

    def finish(self) -> tuple[int, float | None]:
        row = self.conn.execute(
            "SELECT count(*), extract(epoch FROM max(finished_at))::float8"
            f" FROM {self.prefix}_steps"
        ).fetchone()
        return int(row[0]), row[1]


class NaiveDrain(TableDrain):
    name = "naive"
    prefix = "naive"

    def enqueue(self, runs: int) -> None:
        import psycopg

        from benchmarks import chains

        db = self.new_db()
        # A backend flushes its statistics when it exits (else up to 10 s after it went
        # idle): the set-up session ends here so that none of its commits land late.
        with psycopg.connect(db.url, autocommit=True) as setup:
            setup.execute(chains.SCHEMA)
            setup.execute(
                "INSERT INTO naive_runs (id) SELECT g FROM generate_series(1, %s) g", (runs,)
            )
            setup.execute("VACUUM ANALYZE naive_runs")
            setup.execute("VACUUM ANALYZE naive_steps")
        self.conn = psycopg.connect(db.url, autocommit=True)
        self.scratch.defer("close connection", self.conn.close)
        self.env = clean_env(
            LFBENCH_BROKER_URL=self.redis.url,
            LFBENCH_QUEUE=self.queue,
            LFBENCH_DATABASE_URL=db.url,
        )
        app = chains.make_app(self.redis.url, self.queue, db.url)
        try:
            step = app.tasks[chains.NAIVE_STEP]
            with app.producer_or_acquire() as producer:
                for run_id in range(1, runs + 1):
                    step.apply_async((run_id, 1, STATES), producer=producer)
        finally:
            app.close()

    def start_worker(self) -> CeleryWorker:
        return self.worker("benchmarks.chains", self.env)


class FloorDrain(TableDrain):
    """One fenced statement per state, token carried in the message, no start check."""

    name = "floor"
    prefix = "floor"

    def enqueue(self, runs: int) -> None:
        import uuid

        import psycopg

        from benchmarks import floor

        db = self.new_db()
        tokens = [str(uuid.uuid4()) for _ in range(runs)]
        with psycopg.connect(db.url, autocommit=True) as setup:
            setup.execute(floor.SCHEMA)
            with setup.cursor().copy("COPY floor_runs (id, lease_token) FROM STDIN") as copy:
                for run_id, token in enumerate(tokens, start=1):
                    copy.write_row((run_id, token))
            setup.execute("VACUUM ANALYZE floor_runs")
            setup.execute("VACUUM ANALYZE floor_steps")
        self.conn = psycopg.connect(db.url, autocommit=True)
        self.scratch.defer("close connection", self.conn.close)
        self.env = clean_env(
            LFBENCH_BROKER_URL=self.redis.url,
            LFBENCH_QUEUE=self.queue,
            LFBENCH_DATABASE_URL=db.url,
        )
        app = floor.make_app(self.redis.url, self.queue, db.url)
        try:
            step = app.tasks[floor.FLOOR_STEP]
            with app.producer_or_acquire() as producer:
                for run_id, token in enumerate(tokens, start=1):
                    step.apply_async((run_id, 1, token, STATES), producer=producer)
        finally:
            app.close()

    def start_worker(self) -> CeleryWorker:
        return self.worker("benchmarks.floor", self.env)


class PlainDrain(Drain):
    """The stock chain: ``noop`` x 4 then ``last``, Celery's defaults (events off)."""

    name = "plain"
    events = False

    def enqueue(self, runs: int) -> None:
        from celery import chain

        from benchmarks import chains

        self.key = f"lfbench:{self.redis.token}:{self.queue}:runs"
        self.env = clean_env(
            LFBENCH_BROKER_URL=self.redis.url,
            LFBENCH_QUEUE=self.queue,
            LFBENCH_EVENTS="1" if self.events else "0",
        )
        app = chains.make_app(self.redis.url, self.queue, events=self.events)
        try:
            noop, last = app.tasks[chains.NOOP], app.tasks[chains.LAST]
            with app.producer_or_acquire() as producer:
                for _ in range(runs):
                    links = [noop.si() for _ in range(STATES - 1)] + [last.si(self.key)]
                    chain(*links, app=app).apply_async(producer=producer)
        finally:
            app.close()

    def start_worker(self) -> CeleryWorker:
        return self.worker("benchmarks.chains", self.env)

    def done(self) -> int:
        return int(self.redis.client.get(self.key) or 0)

    def finish(self) -> tuple[int, float | None]:
        end = self.redis.client.zscore(f"{self.key}:end", "end")
        return self.done() * STATES, None if end is None else float(end)


class PlainEventsDrain(PlainDrain):
    """The stock chain with task events on both sides (worker and publisher)."""

    name = "plain_events"
    events = True


class PlainReuseDrain(PlainDrain):
    """The stock chain whose Redis channels reuse their client, as leaseflow's do."""

    name = "plain_reuse"

    def start_worker(self) -> CeleryWorker:
        return self.worker("benchmarks.chains", {**self.env, "LFBENCH_REUSE_REDIS_CLIENTS": "1"})


DRAINS = {
    "leaseflow": LeaseflowDrain,
    "leaseflow_events": LeaseflowEventsDrain,
    "leaseflow_inline": LeaseflowInlineDrain,
    "leaseflow_locked": LeaseflowLockedDrain,
    "leaseflow_contended": LeaseflowContendedDrain,
    "leaseflow_hooks": LeaseflowHooksDrain,
    "leaseflow_nometrics": LeaseflowNoMetricsDrain,
    "leaseflow_served": LeaseflowServedDrain,
    "leaseflow_ref": LeaseflowRefDrain,
    "leaseflow_inline_ref": LeaseflowInlineRefDrain,
    "naive": NaiveDrain,
    "floor": FloorDrain,
    "plain": PlainDrain,
    "plain_events": PlainEventsDrain,
    "plain_reuse": PlainReuseDrain,
}


def run(args: Any) -> int:
    profile = "quick" if args.quick else "full"
    runs = args.runs or PROFILES[profile]
    if args.runs:
        profile = f"{profile}+runs={runs}"
    fp = fingerprint()
    print(fingerprint_line(fp), flush=True)
    _warm_client()
    events_default = _leaseflow_events_default()
    log(f"leaseflow's default worker_send_task_events: {events_default}")
    pgss = pg_stat_statements_status()
    log(f"pg_stat_statements: {pgss}")
    began = time.monotonic()
    deadline = Deadline(args.budget, "linear benchmark")
    rounds: list[dict[str, Any]] = []
    with Scratch() as scratch:
        redis = scratch.redis(args.redis_db)
        for r in range(args.rounds):
            per: dict[str, Any] = {}
            for name in rotated(args.systems, r):
                drain = DRAINS[name](scratch, redis, args, f"r{r}")
                per[name] = drain.run(runs, deadline)
                log(f"round {r + 1} {name}: {per[name]}")
                if drain.db is not None:
                    with ignoring_sigint():
                        drain.db.drop()
            rounds.append(per)
        with ignoring_sigint():
            log("stopping workers, dropping databases")
    report = _report(fp, args, profile, runs, rounds, pgss, time.monotonic() - began)
    report["config"]["leaseflow_default_task_events"] = events_default
    _print_table(report)
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return 0


def _warm_client() -> None:
    """Import what the enqueuing client uses, so that no system's client CPU per state
    pays the imports."""
    import celery.canvas  # noqa: F401
    import psycopg  # noqa: F401

    from benchmarks import chains, floor, workflows  # noqa: F401
    from leaseflow import client  # noqa: F401


def _leaseflow_events_default() -> Any:
    """``worker_send_task_events`` of leaseflow's Celery settings, as a fresh process
    (a worker) reads them now (the code may change between runs)."""
    code = (
        "from leaseflow.tasks import celery_app as c;"
        "print(c.celery_settings('q').get('worker_send_task_events', 'unset (off)'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or f"unknown: {out.stderr.strip()[-200:]}"


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return None if not vals else round(percentile(vals, 50) or 0.0, 3)


def _report(
    fp: dict[str, Any],
    args: Any,
    profile: str,
    runs: int,
    rounds: list[dict[str, Any]],
    pgss: str,
    elapsed: float,
) -> dict[str, Any]:
    systems: dict[str, Any] = {}
    for name in args.systems:
        results = [r[name] for r in rounds if name in r]
        systems[name] = {
            "states_per_s": _median([x["states_per_s"] for x in results]),
            "states_per_s_all": [x["states_per_s"] for x in results],
            "commits_per_state": _median([x.get("commits_per_state") for x in results]),
            "wal_flushes_per_state": _median([x.get("wal_flushes_per_state") for x in results]),
            "statements_per_state": _median([x.get("statements_per_state") for x in results]),
            "cpu_ms_per_state": {
                part: _median([(x.get("cpu_ms_per_state") or {}).get(part) for x in results])
                for part in CPU_PARTS
            },
            "rounds": results,
        }

    def r(a: str, b: str) -> float | None:
        if a not in systems or b not in systems:
            return None
        return ratio(systems[a]["states_per_s"], systems[b]["states_per_s"])

    lf = systems.get("leaseflow", {})
    per_round: dict[str, list[float | None]] = {}
    for a, b in PAIRS:
        if a in systems and b in systems:
            per_round[f"{a}/{b}"] = [
                ratio(rnd[a]["states_per_s"], rnd[b]["states_per_s"]) for rnd in rounds
            ]
    return {
        "benchmark": "W1-linear",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "profile": profile,
        "fingerprint": fp,
        "config": {
            "runs": runs,
            "states_per_run": STATES,
            "rounds": args.rounds,
            "pool": args.pool,
            "concurrency": args.concurrency,
            "broker": "redis (scratch db)",
            "result_backend": None,
            "acks_late": True,
            "prefetch": 1,
            "enqueue_first": True,
            "idle_s": args.idle_s,
            "pg_stat_statements": pgss,
        },
        "systems": systems,
        "ratios": {f"{a}/{b}": r(a, b) for a, b in PAIRS},
        "ratios_per_round": per_round,
        "targets": {
            "leaseflow_ge_80pct_plain": (r("leaseflow", "plain") or 0) >= 0.8,
            "leaseflow_inline_ge_2x_plain": (r("leaseflow_inline", "plain") or 0) >= 2.0,
            "inline_commits_per_state_le_1": round(
                systems.get("leaseflow_inline", {}).get("commits_per_state") or 99, 2
            )
            <= 1.0,
            "inline_wal_flushes_per_state_le_1": round(
                systems.get("leaseflow_inline", {}).get("wal_flushes_per_state") or 99, 2
            )
            <= 1.0,
            # to two decimals: worker start-up and lf_workers heartbeats add ~0.003
            "commits_per_state_le_2": round(lf.get("commits_per_state") or 99, 2) <= 2.0,
        },
        "elapsed_s": round(elapsed, 1),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.3g}"
    return str(value)


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"W1 linear: {report['config']['runs']} runs x 5 no-op states")
    for column in (
        "system",
        "states/s (median)",
        "states/s (rounds)",
        f"vs {REFERENCE}",
        "commits/state",
        "WAL flushes/state",
        "statements/state",
        "drain s",
    ):
        table.add_column(column, justify="left" if column == "system" else "right")
    for name, f in report["systems"].items():
        vs = report["ratios"].get(f"{name}/{REFERENCE}")
        table.add_row(
            name,
            _fmt(f["states_per_s"]),
            ", ".join(_fmt(v) for v in f["states_per_s_all"]),
            "1.00x" if name == REFERENCE else (f"{vs:.2f}x" if vs is not None else "-"),
            "-" if f["commits_per_state"] is None else f"{f['commits_per_state']:.3f}",
            "-" if f["wal_flushes_per_state"] is None else f"{f['wal_flushes_per_state']:.3f}",
            _fmt(f["statements_per_state"]) if f["statements_per_state"] is not None else "n/a",
            ", ".join(_fmt(x["drain_s"]) for x in f["rounds"]),
        )
    console = Console(width=140)
    console.print(table)
    console.print(_cpu_table(report))
    ratios = Table(title="throughput ratios (same run; per round in the JSON)")
    ratios.add_column("ratio")
    ratios.add_column("median", justify="right")
    ratios.add_column("rounds", justify="right")
    for name, value in report["ratios"].items():
        if value is None:
            continue
        rounds = report["ratios_per_round"].get(name, [])
        ratios.add_row(name, f"{value:.2f}x", ", ".join(_fmt(v) for v in rounds))
    console.print(ratios)
    console.print(f"pg_stat_statements: {report['config']['pg_stat_statements']}")


def _cpu_table(report: dict[str, Any]) -> Any:
    """CPU ms per state by process (medians over rounds), then each system minus plain."""
    from rich.table import Table

    systems = report["systems"]
    table = Table(title="CPU ms per state by process (median of rounds)")
    table.add_column("system")
    for part in CPU_PARTS:
        table.add_column(part.replace("_", " "), justify="right")

    def cell(v: float | None, signed: bool = False) -> str:
        return "-" if v is None else (f"{v:+.2f}" if signed else f"{v:.2f}")

    for name, f in systems.items():
        table.add_row(name, *(cell(f["cpu_ms_per_state"].get(p)) for p in CPU_PARTS))
    ref = systems.get(REFERENCE, {}).get("cpu_ms_per_state")
    if ref and ref.get("total") is not None:
        for name in CPU_DELTAS:
            c = systems.get(name, {}).get("cpu_ms_per_state")
            if not c or c.get("total") is None:
                continue
            table.add_row(
                f"{name} - {REFERENCE}",
                *(cell((c.get(p) or 0.0) - (ref.get(p) or 0.0), signed=True) for p in CPU_PARTS),
            )
    return table
