"""Shared plumbing for the benchmark workloads: scratch Postgres databases and Redis
dbs, ``celery worker`` subprocesses, a machine fingerprint, percentiles, deadlines.

Everything here cleans up after itself: a :class:`Scratch` stack stops every worker
it started (its whole process family, found by an environment marker), drops every
database it created and deletes every Redis key that appeared in its scratch db,
also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("LFBENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("LFBENCH_REDIS_URL", "redis://127.0.0.1:6379")
#: The environment variable that marks a benchmark-started process and its descendants.
MARKER = "LFBENCH_MARKER"
#: The key that claims a Redis db for one benchmark run.
CLAIM_KEY = "lfbench:claim"


def log(message: str) -> None:
    """Progress goes to stderr: stdout carries only the fingerprint, table and JSON."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- statistics ------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), linear between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def spread(values: Sequence[float], digits: int = 2) -> dict[str, float | int | None]:
    """``{n, p50, p95, max}`` of ``values``, rounded."""

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, digits)

    return {
        "n": len(values),
        "p50": r(percentile(values, 50)),
        "p95": r(percentile(values, 95)),
        "max": r(max(values) if values else None),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 2)


class Deadline:
    """A time budget: ``check()`` raises once it is spent."""

    def __init__(self, seconds: float, what: str) -> None:
        self.at = time.monotonic() + seconds
        self.what = what

    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self) -> None:
        if self.left() <= 0:
            raise TimeoutError(f"{self.what}: time budget spent")


# -- fingerprint -----------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def fingerprint() -> dict[str, Any]:
    """nproc, CPU model, Python, Celery/kombu, PostgreSQL and Redis server versions."""
    import celery
    import kombu
    import psycopg
    import redis

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    try:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            info["postgres"] = row[0].split()[0] if row else "unknown"
    except psycopg.Error as exc:
        info["postgres"] = f"unreachable ({exc.__class__.__name__})"
    try:
        client = redis.Redis.from_url(f"{REDIS_BASE}/0", socket_connect_timeout=2)
        info["redis"] = client.info("server").get("redis_version", "unknown")
        client.close()
    except redis.RedisError as exc:
        info["redis"] = f"unreachable ({exc.__class__.__name__})"
    return info


def fingerprint_line(fp: dict[str, Any]) -> str:
    return (
        f"fingerprint: nproc={fp['nproc']} cpu={fp['cpu']!r} python={fp['python']} "
        f"celery={fp['celery']} kombu={fp['kombu']} postgres={fp['postgres']} "
        f"redis={fp['redis']} loadavg_1m={fp['loadavg_1m']}"
    )


# -- scratch resources -----------------------------------------------------------------


class ScratchRedis:
    """A Redis db of this run's own (never db 0), emptied of what the run created.

    Without an explicit ``db``, claims the first empty db from 15 down to 1 with a
    ``SET NX`` claim key. At the end it deletes the keys that were not there at the
    start (never ``FLUSHDB``), then the claim key.
    """

    def __init__(self, base: str = REDIS_BASE, db: int | None = None) -> None:
        import redis

        self.base = base.rstrip("/")
        self.token = uuid.uuid4().hex[:10]
        candidates = [db] if db is not None else list(range(15, 0, -1))
        for n in candidates:
            if n == 0:
                raise ValueError("db 0 is the shared db: pick another --redis-db")
            client = redis.Redis.from_url(f"{self.base}/{n}", socket_connect_timeout=3)
            if db is None and client.dbsize() != 0:
                client.close()
                continue
            if not client.set(CLAIM_KEY, self.token, nx=True, ex=6 * 3600):
                client.close()
                continue
            self.db = n
            self.client = client
            self.before = {k for k in client.scan_iter(count=1000)}
            self.url = f"{self.base}/{n}"
            return
        raise RuntimeError(f"no free Redis db among {candidates} at {self.base}")

    def cleanup(self) -> int:
        """Delete every key created since the start; returns how many."""
        created = [k for k in self.client.scan_iter(count=1000) if k not in self.before]
        for i in range(0, len(created), 500):
            self.client.delete(*created[i : i + 500])
        if self.client.get(CLAIM_KEY) == self.token.encode():
            self.client.delete(CLAIM_KEY)
        self.client.close()
        return len(created)


class ScratchDatabase:
    """A database ``lf_bench_<random>`` created from scratch and dropped at the end."""

    def __init__(self, suffix: str = "", admin_url: str = ADMIN_URL) -> None:
        import psycopg

        self.admin_url = admin_url
        self.name = f"lf_bench_{uuid.uuid4().hex[:10]}{suffix}"
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        base, _, _ = admin_url.rpartition("/")
        self.url = f"{base}/{self.name}"  # libpq form

    @property
    def sqlalchemy_url(self) -> str:
        from leaseflow import settings

        return settings.sqlalchemy_url(self.url)

    def migrate(self) -> None:
        """Alembic to head, then ``VACUUM ANALYZE`` and a ``CHECKPOINT`` (BENCHMARKS.md)."""
        import psycopg

        from leaseflow import migrations

        migrations.upgrade(self.sqlalchemy_url)
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
            with contextlib.suppress(psycopg.Error):  # needs superuser or pg_checkpoint
                conn.execute("CHECKPOINT")

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


# -- worker subprocesses ---------------------------------------------------------------


def _processes_with(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment holds ``marker``."""
    needle = marker.encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes() + b"\0":
                continue
            stat = (entry / "stat").read_text()
            if stat[stat.rindex(")") + 2] in "ZX":
                continue
        except (OSError, ValueError):
            continue
        found.append(int(entry.name))
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """The parent environment without ``LEASEFLOW_*``/``LFBENCH_*``, the repo on PYTHONPATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LEASEFLOW_", "LFBENCH_", "CELERY_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


class CeleryWorker:
    """A real ``celery -A <app> worker`` subprocess leading its own process group.

    Its environment carries a marker of its own, inherited by the pool children,
    so :meth:`stop` finds and kills the whole family even if a child escaped.
    """

    def __init__(
        self,
        app: str,
        *,
        name: str,
        queue: str,
        env: dict[str, str],
        log_dir: Path,
        pool: str = "prefork",
        concurrency: int = 2,
        loglevel: str = "WARNING",
        extra: Sequence[str] = (),
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.marker = uuid.uuid4().hex
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-n",
            f"{name}-{self.marker[:6]}@%h",
            "-Q",
            queue,
            "-l",
            loglevel,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *extra,
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            env={**env, MARKER: self.marker},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # ``python -m`` puts the working directory first on sys.path: it decides which
            # leaseflow the worker imports (a ``--ref`` worktree's, for the A/B systems)
            cwd=cwd,
            start_new_session=True,  # pgid == pid; Ctrl-C in the terminal does not reach it
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        """Raise with the log tail if the worker died."""
        if not self.alive():
            raise RuntimeError(
                f"worker {self.name} exited with {self.proc.returncode}:\n{self.tail()}"
            )

    def tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def members(self) -> list[int]:
        return _processes_with(f"{MARKER}={self.marker}")

    def _signal_group(self, sig: int) -> None:
        if self.proc.returncode is None:  # the pgid cannot be reused before we reap it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """Warm shutdown (SIGTERM), SIGKILL after ``timeout``, then any straggler."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)
        for pid in self.members():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not self._log.closed:
            self._log.close()


# -- the cleanup stack -----------------------------------------------------------------


class Scratch(contextlib.ExitStack):
    """An exit stack that also turns SIGTERM/SIGHUP into a clean unwind, and owns a
    log directory (removed on success, kept and named on failure)."""

    def __enter__(self) -> Scratch:
        super().__enter__()
        self.log_dir = Path(tempfile.mkdtemp(prefix="lfbench-"))
        self._old: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def defer(self, what: str, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the way out; a failing cleanup is reported, not fatal."""

        def guarded() -> None:
            try:
                fn()
            except Exception as exc:
                log(f"cleanup {what} failed: {exc!r}")

        self.callback(guarded)

    def redis(self, db: int | None = None) -> ScratchRedis:
        """A scratch Redis db whose keys are deleted on the way out."""
        redis = ScratchRedis(db=db)

        def clean() -> None:
            with ignoring_sigint():
                log(f"removed {redis.cleanup()} Redis keys from db {redis.db}")

        self.defer("Redis keys", clean)
        return redis

    def database(self, *, migrate: bool = False) -> ScratchDatabase:
        """A scratch database dropped on the way out (migrated to head if asked)."""
        db = ScratchDatabase()
        self.defer(f"drop database {db.name}", db.drop)
        if migrate:
            db.migrate()
        return db

    def worker(
        self,
        app: str,
        *,
        name: str,
        queue: str,
        env: dict[str, str],
        args: Any,
        extra: Sequence[str] = (),
        cwd: Path = ROOT,
    ) -> CeleryWorker:
        """A ``celery -A app worker`` with ``args.pool``/``concurrency``/``loglevel``
        (and ``extra`` options, e.g. ``-E``), run in ``cwd`` (whose packages it imports
        first), stopped on the way out."""
        w = CeleryWorker(
            app,
            name=name,
            queue=queue,
            env=env,
            log_dir=self.log_dir,
            pool=args.pool,
            concurrency=args.concurrency,
            loglevel=args.loglevel,
            extra=extra,
            cwd=cwd,
        )
        self.defer(f"stop worker {name}", w.stop)
        return w

    def __exit__(self, *exc: Any) -> bool:
        try:
            return bool(super().__exit__(*exc))
        finally:
            for sig, old in self._old.items():
                signal.signal(sig, old)
            if exc[0] is None:
                shutil.rmtree(self.log_dir, ignore_errors=True)
            else:
                log(f"worker logs kept in {self.log_dir}")


@contextlib.contextmanager
def ignoring_sigint() -> Iterator[None]:
    """Let a cleanup finish even if Ctrl-C is pressed again."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def rotated(items: Sequence[Any], k: int) -> list[Any]:
    k %= max(1, len(items))
    return list(items[k:]) + list(items[:k])


# -- CPU per component -----------------------------------------------------------------


def _cpu_ticks(pid: int) -> int | None:
    """utime + stime of ``pid`` in clock ticks (None if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def _pids_named(*names: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() in names:
                    found.append(int(entry.name))
    return found


#: Auxiliary PostgreSQL processes (``postgres: <cluster>: <what>``): cluster-wide work a
#: system's commits cause (WAL writer, checkpointer, ...), counted with its backends.
PG_AUX = ("checkpointer", "background writer", "walwriter", "autovacuum launcher", "logical")


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _pg_pids(database: str | None) -> list[int]:
    """PostgreSQL processes: all of them, or (``database`` given) the postmaster, the
    auxiliary processes and the backends of ``database`` only, so that other databases'
    traffic on a shared server is not counted."""
    pids = _pids_named("postgres", "postmaster")
    if database is None:
        return pids
    out = []
    for pid in pids:
        cmd = _cmdline(pid)
        backend = cmd.startswith("postgres:")
        if not backend or f" {database} " in cmd or any(a in cmd for a in PG_AUX):
            out.append(pid)
    return out


class CpuMeter:
    """CPU seconds spent by the worker's main process, its pool processes, PostgreSQL
    (all processes, or with ``database`` its backends plus the cluster's auxiliary
    processes) and all redis-server processes between :meth:`start` and :meth:`stop`.

    A process born in between counts from zero; one that exits in between is lost,
    so stop the meter before stopping the worker. redis-server is the shared one:
    other clients' commands meanwhile are counted too.
    """

    HZ = os.sysconf("SC_CLK_TCK")

    def __init__(
        self, worker_pids: Callable[[], list[int]], main_pid: int, database: str | None = None
    ) -> None:
        self.worker_pids = worker_pids
        self.main_pid = main_pid
        self.database = database
        self.before: dict[str, dict[int, int]] = {}

    def _snapshot(self) -> dict[str, dict[int, int]]:
        groups = {
            "worker_main": [self.main_pid],
            "worker_pool": [p for p in self.worker_pids() if p != self.main_pid],
            "postgres": _pg_pids(self.database),
            "redis": _pids_named("redis-server"),
        }
        out: dict[str, dict[int, int]] = {}
        for group, pids in groups.items():
            out[group] = {p: t for p in pids if (t := _cpu_ticks(p)) is not None}
        return out

    def start(self) -> None:
        self.before = self._snapshot()

    def stop(self) -> dict[str, float]:
        """CPU seconds per component (``worker`` = main + pool)."""
        after = self._snapshot()
        out = {}
        for group, ticks in after.items():
            base = self.before.get(group, {})
            out[group] = sum(t - base.get(p, 0) for p, t in ticks.items()) / self.HZ
        out["worker"] = out["worker_main"] + out["worker_pool"]
        return out


# -- open-loop load (W2 latency, soak) -------------------------------------------------

#: leaseflow's W1 throughput on this class of machine (benchmarks/RESULTS.md, session 2
#: W1, prefork -c 2, median of 3 rounds: 216.9 states/s): the default base of the
#: open-loop rates (W2: 50% of it, the soak: 70%). Pass ``--w1-states-per-s`` with a
#: figure of the day.
W1_STATES_PER_S = 216.9


def distribution(values: Sequence[float], digits: int = 2) -> dict[str, float | int | None]:
    """``{n, p50, p90, p99, p999, max}`` of ``values``, rounded."""

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, digits)

    out: dict[str, float | int | None] = {"n": len(values)}
    for key, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9)):
        out[key] = r(percentile(values, q))
    out["max"] = r(max(values) if values else None)
    return out


def poisson_offsets(rate: float, seconds: float, seed: int) -> list[float]:
    """Send times (s after the start) of Poisson arrivals at ``rate``/s within ``seconds``:
    exponential gaps from a seeded generator, so every system gets the same schedule."""
    import random

    if rate <= 0:
        raise ValueError("the arrival rate must be positive")
    rng = random.Random(seed)
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < seconds:
        out.append(t)
        t += rng.expovariate(rate)
    return out


class Sent:
    """One scheduled send: its index, the scheduled and actual wall-clock times
    (``time.time()``), what ``send`` returned, or the error it raised."""

    __slots__ = ("error", "index", "scheduled", "sent", "value")

    def __init__(
        self, index: int, scheduled: float, sent: float, value: Any, error: str | None
    ) -> None:
        self.index = index
        self.scheduled = scheduled
        self.sent = sent
        self.value = value
        self.error = error


class OpenLoopSender:
    """A thread that calls ``send(i)`` at ``start + offsets[i]``, never waiting for a run
    to finish (open loop). Behind schedule it sends at once and never skips one; the
    scheduled time is recorded, so lateness counts in latency (no coordinated omission).
    """

    def __init__(self, offsets: Sequence[float], send: Callable[[int], Any]) -> None:
        import threading

        self.offsets = list(offsets)
        self.send = send
        self.sent: list[Sent] = []
        self.t0_wall = 0.0
        self._t0_mono = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lfbench-sender", daemon=True)

    def start(self) -> float:
        """Start sending now; returns the wall-clock time of offset 0."""
        self._t0_mono = time.monotonic()
        self.t0_wall = time.time()
        self._thread.start()
        return self.t0_wall

    def _run(self) -> None:
        for i, offset in enumerate(self.offsets):
            wait = self._t0_mono + offset - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            if self._stop.is_set():
                return
            scheduled = self.t0_wall + offset
            try:
                value, error = self.send(i), None
            except Exception as exc:
                value, error = None, repr(exc)
            self.sent.append(Sent(i, scheduled, time.time(), value, error))

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def ok(self) -> list[Sent]:
        return [s for s in self.sent if s.error is None]

    def errors(self) -> list[str]:
        return [s.error for s in self.sent if s.error is not None]

    def lag_ms(self) -> list[float]:
        """Send completion minus scheduled time, ms (the sender's own delay)."""
        return [(s.sent - s.scheduled) * 1000 for s in self.sent]


def rss_kb(pids: Iterable[int]) -> int:
    """The sum of ``VmRSS`` (kB, from ``/proc/<pid>/status``) over ``pids`` still alive."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def warm_shutdown(worker: CeleryWorker, timeout: float = 30.0) -> tuple[float, bool]:
    """SIGTERM to the worker's main process only (Celery's warm shutdown: stop consuming,
    finish the tasks in hand, stop the pool, exit), like ``kill -TERM $MAINPID``; after
    ``timeout`` the whole family is SIGKILLed. Returns (seconds taken, exited cleanly)."""
    began = time.monotonic()
    clean = False
    if worker.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.proc.pid, signal.SIGTERM)
        try:
            clean = worker.proc.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            clean = False
    elapsed = time.monotonic() - began
    worker.stop()  # SIGKILL if still running, any straggling child, close the log
    return elapsed, clean
