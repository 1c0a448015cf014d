"""W5 crash recovery: ``kill -9`` of a whole worker (main process and pool children)
while a slow state runs; how long until the state restarts on the standby worker.

Setup: a fresh migrated database; two real ``celery worker`` subprocesses (prefork -c 2,
acks_late, prefetch 1) on the same Redis scratch db and queue, plus one ``celery beat``
(reaper every ``--reaper-interval`` s); lease TTL ``--ttl`` s, heartbeat every
``--heartbeat`` s. Workflow ``recovery_bench``: ``first`` -> ``slow`` (sleeps ``--sleep``
s, 3 attempts) -> ``last``.

Each trial starts one run, waits until ``slow`` holds a lease, lets it run for
``--kill-after`` s, then SIGKILLs every process of the worker that owns the lease
(found by its pool child's pid in ``lease_owner``). The other worker is the standby;
once the retried attempt has started, a fresh worker replaces the killed one, so every
trial starts with two workers.

Metrics per trial (host clock for the kill, database clock for the rest; one host):
  detect   kill -> the reaper's ``lease_expired`` row in ``lf_steps`` (its finished_at)
  restart  kill -> the retried attempt's claim (``started_at`` of the committed ``slow``)
  budget   lease TTL + reaper interval + 1 s (BENCHMARKS.md W5 target for restart)
  duplicates  committed executions per state beyond 1 (must be 0); lost = run not completed
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

from benchmarks.common import (
    MARKER,
    ROOT,
    CeleryWorker,
    Deadline,
    Scratch,
    clean_env,
    fingerprint,
    fingerprint_line,
    ignoring_sigint,
    log,
    percentile,
)

HELP = "W5: kill -9 a worker mid-state; time until the state restarts on a standby"

PROFILES = {"full": 5, "quick": 3}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=int, help="kill trials (full 5, quick 3)")
    p.add_argument("--quick", action="store_true", help="quick profile: 3 trials")
    p.add_argument("--ttl", type=float, default=3.0, help="lease TTL s (default 3)")
    p.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval s")
    p.add_argument("--reaper-interval", type=float, default=1.0, help="reaper interval s")
    p.add_argument("--sleep", type=float, default=2.0, help="the slow state's sleep s")
    p.add_argument("--kill-after", type=float, default=0.5, help="s into the slow state")
    p.add_argument("--concurrency", type=int, default=2, help="worker -c (default 2)")
    p.add_argument("--redis-db", type=int, help="Redis db to use (default: a free one, 15..1)")
    p.add_argument("--budget", type=float, default=600.0, help="give up after this many s")


class Beat(CeleryWorker):
    """A ``celery -A leaseflow.tasks beat`` subprocess (same stop/cleanup as a worker)."""

    def __init__(self, *, env: dict[str, str], log_dir: Any) -> None:
        self.name = "beat"
        self.log_path = log_dir / "beat.log"
        self.marker = uuid.uuid4().hex
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "leaseflow.tasks",
            "beat",
            "-l",
            "INFO",
            "-s",
            str(log_dir / "beat-schedule"),
            "--pidfile",
            "",
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            env={**env, MARKER: self.marker},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            start_new_session=True,
        )


def _kill9(worker: CeleryWorker) -> None:
    """SIGKILL the main process and every pool child (``kill -9 $MAIN $(pgrep -P)``)."""
    pids = set(worker.members()) | {worker.proc.pid}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(worker.proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.proc.wait(timeout=10)


def _wait_ready(worker: CeleryWorker, deadline: Deadline, timeout: float = 60.0) -> None:
    limit = time.monotonic() + timeout
    while "ready." not in worker.tail(100_000):
        worker.check()
        deadline.check()
        if time.monotonic() > limit:
            raise TimeoutError(f"worker {worker.name} not ready in {timeout}s")
        time.sleep(0.1)


def run(args: Any) -> int:
    import psycopg

    from benchmarks import workflows
    from leaseflow.client import Client
    from leaseflow.settings import Settings

    profile = "quick" if args.quick else "full"
    trials_n = args.trials or PROFILES[profile]
    fp = fingerprint()
    print(fingerprint_line(fp), flush=True)
    budget_s = args.ttl + args.reaper_interval + 1.0
    began = time.monotonic()
    deadline = Deadline(args.budget, "recovery benchmark")
    trials: list[dict[str, Any]] = []
    with Scratch() as scratch:
        redis = scratch.redis(args.redis_db)
        db = scratch.database(migrate=True)
        queue = f"lfbench-recovery-{redis.token}"
        knobs = {
            "LEASEFLOW_LEASE_TTL": str(args.ttl),
            "LEASEFLOW_HEARTBEAT_INTERVAL": str(args.heartbeat),
            "LEASEFLOW_REAPER_INTERVAL": str(args.reaper_interval),
        }
        env = clean_env(
            LEASEFLOW_DATABASE_URL=db.sqlalchemy_url,
            LEASEFLOW_BROKER_URL=redis.url,
            LEASEFLOW_DEFAULT_QUEUE=queue,
            LEASEFLOW_WORKFLOWS="benchmarks.workflows",
            **knobs,
        )
        settings = Settings(
            database_url=db.sqlalchemy_url,
            broker_url=redis.url,
            default_queue=queue,
            workflows=["benchmarks.workflows"],
            lease_ttl=args.ttl,
            heartbeat_interval=args.heartbeat,
            reaper_interval=args.reaper_interval,
        )
        serial = 0

        def new_worker() -> CeleryWorker:
            nonlocal serial
            serial += 1
            w = CeleryWorker(
                "leaseflow.tasks",
                name=f"w{serial}",
                queue=queue,
                env=env,
                log_dir=scratch.log_dir,
                concurrency=args.concurrency,
                loglevel="INFO",
            )
            scratch.defer(f"stop worker w{serial}", w.stop)
            return w

        workers = [new_worker(), new_worker()]
        beat = Beat(env=env, log_dir=scratch.log_dir)
        scratch.defer("stop beat", beat.stop)
        for w in workers:
            _wait_ready(w, deadline)
        client = Client(settings=settings)
        scratch.defer("close client", client.close)
        conn = psycopg.connect(db.url, autocommit=True)
        scratch.defer("close connection", conn.close)

        def wait_for(sql: str, params: tuple[Any, ...], timeout: float) -> Any:
            limit = time.monotonic() + timeout
            for _ in range(100_000):
                row = conn.execute(sql, params).fetchone()
                if row is not None:
                    return row
                if time.monotonic() > limit:
                    break
                deadline.check()
                time.sleep(0.02)
            raise TimeoutError(f"not within {timeout}s: {sql.strip()[:80]}")

        # warm-up: one run end to end (imports, pools and connections warm)
        warm = client.start(workflows.recovery_bench, {"sleep": 0.1})
        wait_for("SELECT 1 FROM lf_runs WHERE id = %s AND status = 'completed'", (warm,), 60)
        log(
            f"workers ready; {trials_n} kill trials"
            f" (TTL {args.ttl}s, reaper {args.reaper_interval}s)"
        )
        for i in range(trials_n):
            run_id = client.start(workflows.recovery_bench, {"sleep": args.sleep})
            owner, _claimed = wait_for(
                "SELECT lease_owner, claimed_at FROM lf_runs"
                " WHERE id = %s AND state = 'slow' AND status = 'running'",
                (run_id,),
                30,
            )
            time.sleep(args.kill_after)
            pid = int(owner.rsplit(":", 1)[1])
            victim = next((w for w in workers if pid in w.members()), None)
            if victim is None:
                raise RuntimeError(f"lease owner {owner} is no process of ours")
            t_kill = time.time()
            _kill9(victim)
            kill_ms = (time.time() - t_kill) * 1000
            workers.remove(victim)
            log(f"trial {i + 1}: killed {victim.name} (owner {owner}) in {kill_ms:.0f} ms")
            wait_for(
                "SELECT 1 FROM lf_steps WHERE run_id = %s AND state = 'slow'"
                " AND outcome = 'lease_expired'",
                (run_id,),
                budget_s + 30,
            )
            wait_for(
                "SELECT 1 FROM lf_runs WHERE id = %s AND state = 'slow' AND status = 'running'",
                (run_id,),
                30,
            )
            replacement = new_worker()
            workers.append(replacement)
            wait_for(
                "SELECT 1 FROM lf_runs WHERE id = %s AND status NOT IN"
                " ('pending', 'running', 'waiting')",
                (run_id,),
                args.sleep + 60,
            )
            _wait_ready(replacement, deadline)
            row = conn.execute(
                """
                SELECT r.status,
                       extract(epoch FROM e.finished_at)::float8,
                       extract(epoch FROM s.started_at)::float8,
                       extract(epoch FROM e.started_at)::float8,
                       (SELECT count(*) FROM lf_steps x WHERE x.run_id = r.id
                          AND x.outcome <> 'lease_expired' AND x.state = 'slow'),
                       (SELECT count(*) FROM lf_steps x WHERE x.run_id = r.id
                          AND x.outcome <> 'lease_expired'),
                       (SELECT count(*) FROM lf_steps x WHERE x.run_id = r.id
                          AND x.outcome = 'lease_expired'),
                       s.attempt, s.worker
                  FROM lf_runs r
                  JOIN lf_steps e ON e.run_id = r.id AND e.outcome = 'lease_expired'
                  JOIN lf_steps s ON s.run_id = r.id AND s.state = 'slow'
                                 AND s.outcome <> 'lease_expired'
                 WHERE r.id = %s
                """,
                (run_id,),
            ).fetchone()
            status, reaped, restarted, first_claim, slow_n, steps_n, reaps, attempt, by = row
            trial = {
                "run_id": run_id,
                "status": status,
                "killed": victim.name,
                "detect_s": round(reaped - t_kill, 3),
                "restart_s": round(restarted - t_kill, 3),
                "killed_attempt_age_s": round(t_kill - first_claim, 3),
                "slow_commits": int(slow_n),
                "steps_committed": int(steps_n),
                "reaps": int(reaps),
                "retry_attempt": int(attempt),
                "retried_by": by,
            }
            trials.append(trial)
            log(f"trial {i + 1}: {trial}")
        with ignoring_sigint():
            log("stopping workers and beat, dropping the database")
    report = _report(fp, args, profile, trials, budget_s, time.monotonic() - began)
    _print_table(report)
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return 0 if report["within_budget"] and report["no_duplicates"] else 1


def _stats(values: list[float]) -> dict[str, float | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    return {
        "median": r(percentile(values, 50)),
        "min": r(min(values) if values else None),
        "max": r(max(values) if values else None),
    }


def _report(
    fp: dict[str, Any],
    args: Any,
    profile: str,
    trials: list[dict[str, Any]],
    budget_s: float,
    elapsed: float,
) -> dict[str, Any]:
    restart = [t["restart_s"] for t in trials]
    detect = [t["detect_s"] for t in trials]
    return {
        "benchmark": "W5-recovery",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "profile": profile,
        "fingerprint": fp,
        "config": {
            "lease_ttl_s": args.ttl,
            "heartbeat_s": args.heartbeat,
            "reaper_interval_s": args.reaper_interval,
            "slow_sleep_s": args.sleep,
            "kill_after_s": args.kill_after,
            "pool": "prefork",
            "concurrency": args.concurrency,
            "workers": "2 (killed one replaced after each trial) + 1 beat",
            "broker": "redis (scratch db)",
            "kill": "SIGKILL main process + pool children",
        },
        "trials": trials,
        "detect_s": _stats(detect),
        "restart_s": _stats(restart),
        "budget_s": budget_s,
        "restart_max_over_budget": round(max(restart) / budget_s, 2) if restart else None,
        "within_budget": bool(restart) and max(restart) <= budget_s,
        "no_duplicates": all(t["slow_commits"] == 1 and t["steps_committed"] == 3 for t in trials),
        "lost_runs": sum(t["status"] != "completed" for t in trials),
        "elapsed_s": round(elapsed, 1),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = report["config"]
    table = Table(
        title=f"W5 recovery: kill -9 mid-state (TTL {cfg['lease_ttl_s']}s, reaper "
        f"{cfg['reaper_interval_s']}s, budget {report['budget_s']}s)"
    )
    for column in ("trial", "detect s", "restart s", "attempt", "slow commits", "status"):
        table.add_column(column, justify="right")
    for i, t in enumerate(report["trials"], 1):
        table.add_row(
            str(i),
            f"{t['detect_s']:.2f}",
            f"{t['restart_s']:.2f}",
            str(t["retry_attempt"]),
            str(t["slow_commits"]),
            t["status"],
        )
    d, r = report["detect_s"], report["restart_s"]
    table.add_row("median", _f(d["median"]), _f(r["median"]), "", "", "")
    table.add_row("max", _f(d["max"]), _f(r["max"]), "", "", "")
    console = Console(width=140)
    console.print(table)
    console.print(
        f"restart max / budget = {report['restart_max_over_budget']}x; within budget: "
        f"{report['within_budget']}; duplicates: {not report['no_duplicates']}; "
        f"lost runs: {report['lost_runs']}"
    )


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"
