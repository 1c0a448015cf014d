"""``leaseflow demo``: the example agent workflow end to end, on whatever database
and broker the settings resolve to (the embedded defaults when none is set).

Starts its own worker and beat processes, runs N runs with a live progress bar,
optionally SIGKILLs the worker mid-state (``--crash``) to show the reaper
recovering every run, and prints a summary. Every process it starts is stopped
when it returns, on Ctrl-C included.

The worker runs 4 processes by default: the states mostly wait (a simulated model or
tool call), so 4 keep two cores busy. The demo keeps as many runs in flight as the
worker has processes, starting the next as one finishes, like a client with a
concurrency limit: the state-to-state hop it reports is then leaseflow's and the
broker's latency, not the wait behind a backlog of its own making (20 runs queued at
once on two processes wait about 600 ms per hop). The hop is counted between states
that follow each other directly (not across a fork's branches or a retry's backoff).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from leaseflow import local
from leaseflow.client import Client
from leaseflow.examples import agent_workflow
from leaseflow.settings import Settings

WORKFLOW_MODULE = agent_workflow.__name__
#: Seconds between two looks at the runs' progress (a finished run's successor starts then).
POLL_INTERVAL = 0.05
PROMPTS = (
    "summarise the incident report",
    "draft a reply to the customer",
    "plan the data migration",
    "explain the invoice mismatch",
    "triage the failing deployment",
)


@dataclass
class DemoReport:
    runs: int
    completed: int = 0
    failed: int = 0
    unfinished: int = 0
    states: int = 0
    branches: int = 0
    retries: int = 0
    recovered: int = 0
    leases_expired: int = 0
    duration_p50_ms: float = 0.0
    duration_p95_ms: float = 0.0
    hop_p50_ms: float = 0.0
    hop_p95_ms: float = 0.0
    wall_s: float = 0.0
    crashed: bool = False
    run_ids: list[str] = field(default_factory=list)
    #: The process groups (one per worker or beat) the demo started and stopped.
    process_groups: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.completed == self.runs


class _Process:
    """A child process in its own session, logged to a file, stopped for sure."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the whole process group: the main process and its pool children."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # pool children left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._log.close()


def _interrupt_on_termination() -> Callable[[], None]:
    """Treat SIGTERM and SIGHUP like Ctrl-C, so that every started process is stopped.

    Returns the function that puts the previous handlers back.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def demo_settings(base: Settings, *, crash: bool) -> Settings:
    """The demo's own queue and short maintenance intervals, on ``base``'s services."""
    return base.model_copy(
        update={
            "workflows": [WORKFLOW_MODULE],
            "default_queue": f"leaseflow-demo-{uuid.uuid4().hex[:8]}",
            "lease_ttl": 3.0 if crash else 15.0,
            "heartbeat_interval": 1.0,
            "reaper_interval": 1.0,
            "dispatch_interval": 1.0,
            "dispatch_timeout": 5.0,
        }
    )


def _env(settings: Settings) -> dict[str, str]:
    """The environment of a worker or beat: ``settings``, and the embedded server's
    marker when it is the database, so that they register as its owners."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEASEFLOW_")}
    for key, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(value)
        env[f"LEASEFLOW_{key.upper()}"] = str(value)
    env.update(local.child_env(settings))
    return env


def _worker(name: str, settings: Settings, log_dir: Path, concurrency: int) -> _Process:
    cmd = [
        sys.executable, "-m", "celery", "-A", "leaseflow.tasks", "worker",
        "-P", "prefork", "-c", str(concurrency), "-n", f"{name}@%h",
        "-Q", settings.default_queue, "-l", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    return _Process(name, cmd, _env(settings), log_dir)


def _beat(settings: Settings, log_dir: Path) -> _Process:
    cmd = [
        sys.executable, "-m", "celery", "-A", "leaseflow.tasks", "beat", "-l", "INFO",
        "-s", str(log_dir / "beat-schedule"), "--pidfile", "",
    ]  # fmt: skip
    return _Process("beat", cmd, _env(settings), log_dir)


_STATUS_SQL = "SELECT status, count(*) FROM lf_runs WHERE id = ANY(%s::uuid[]) GROUP BY status"
_RUNNING_SQL = (
    "SELECT count(*) FROM lf_runs WHERE id = ANY(%s::uuid[]) "
    "AND status = 'running' AND state = 'inferring'"
)
_BRANCH_SQL = (
    "SELECT count(*) FROM lf_branches WHERE run_id = ANY(%s::uuid[]) AND status = 'completed'"
)
_STEP_SQL = """
WITH s AS (
    SELECT run_id, seq, outcome, duration_ms, started_at,
           lag(finished_at) OVER (PARTITION BY run_id ORDER BY seq) AS prev_finished,
           lag(outcome) OVER (PARTITION BY run_id ORDER BY seq) AS prev_outcome
      FROM lf_steps WHERE run_id = ANY(%s::uuid[])
)
SELECT count(*) FILTER (WHERE outcome IN ('next', 'fork', 'completed', 'failed')),
       count(*) FILTER (WHERE outcome = 'retry'),
       count(*) FILTER (WHERE outcome = 'lease_expired'),
       count(DISTINCT run_id) FILTER (WHERE outcome = 'lease_expired'),
       coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms), 0),
       coalesce(percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms), 0),
       coalesce(percentile_cont(0.5) WITHIN GROUP (
           ORDER BY extract(epoch FROM started_at - prev_finished) * 1000)
           FILTER (WHERE prev_outcome = 'next'), 0),
       coalesce(percentile_cont(0.95) WITHIN GROUP (
           ORDER BY extract(epoch FROM started_at - prev_finished) * 1000)
           FILTER (WHERE prev_outcome = 'next'), 0)
  FROM s
"""
#: The hop is from a state's commit to the next state's start, when the commit moved the
#: run straight on (outcome ``next``): after a fork the branches run in between, after a
#: retry its backoff is waited on purpose, after an expired lease the reaper's interval.


def _query(client: Client, sql: str, run_ids: list[str]) -> list[tuple[Any, ...]]:
    with client.engine_store.connection() as conn:
        return conn.execute(sql, (run_ids,)).fetchall()


def run_demo(
    base: Settings,
    *,
    runs: int = 20,
    crash: bool = False,
    concurrency: int = 4,
    timeout: float = 120.0,
    console: Console | None = None,
) -> DemoReport:
    """Run the demo; every process started here is stopped before it returns."""
    console = console or Console(stderr=False)
    settings = demo_settings(base, crash=crash)
    log_dir = Path(tempfile.mkdtemp(prefix="leaseflow-demo-"))
    report = DemoReport(runs=runs, crashed=crash)
    processes: list[_Process] = []
    started = time.monotonic()
    restore = _interrupt_on_termination()
    try:
        with console.status("starting a worker and beat ..."):
            worker = _worker("worker1", settings, log_dir, concurrency)
            processes.append(worker)
            processes.append(_beat(settings, log_dir))
            worker.wait_for("ready.", timeout=60)
        with Client(settings=settings) as client:

            def start_more(done: int) -> None:
                """Start runs until ``concurrency`` are in flight (or all are started)."""
                while len(report.run_ids) < runs and len(report.run_ids) - done < concurrency:
                    i = len(report.run_ids)
                    payload = {
                        "prompt": PROMPTS[i % len(PROMPTS)],
                        "user": f"user-{i % 7}",
                        "crash_pause_s": 2.0 if crash else 0.0,
                    }
                    report.run_ids.append(client.start(agent_workflow.agent, payload))

            start_more(0)
            _follow(
                client, report, processes, settings, log_dir, concurrency, timeout, console,
                start_more,
            )  # fmt: skip
            _summarise(client, report)
    finally:
        report.wall_s = time.monotonic() - started
        for proc in reversed(processes):
            proc.stop()
        report.process_groups = [proc.proc.pid for proc in processes]
        restore()
    _print(report, console, log_dir)
    return report


def _follow(
    client: Client,
    report: DemoReport,
    processes: list[_Process],
    settings: Settings,
    log_dir: Path,
    concurrency: int,
    timeout: float,
    console: Console,
    start_more: Callable[[int], None],
) -> None:
    deadline = time.monotonic() + timeout
    killed = not report.crashed
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("runs", total=report.runs, detail="")
        while True:
            counts = dict(_query(client, _STATUS_SQL, report.run_ids))
            done = counts.get("completed", 0) + counts.get("failed", 0)
            detail = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            progress.update(task, completed=done, detail=detail)
            if done >= report.runs or time.monotonic() > deadline:
                break
            start_more(done)
            if not killed and _query(client, _RUNNING_SQL, report.run_ids)[0][0] > 0:
                killed = True
                processes[0].kill()
                progress.console.print(
                    "[red]SIGKILL[/red] worker1 (main process and pool) in the middle of "
                    "'inferring'; starting worker2, the reaper will hand the runs over"
                )
                replacement = _worker("worker2", settings, log_dir, concurrency)
                processes.append(replacement)
            time.sleep(POLL_INTERVAL)


def _summarise(client: Client, report: DemoReport) -> None:
    counts = dict(_query(client, _STATUS_SQL, report.run_ids))
    report.completed = counts.get("completed", 0)
    report.failed = counts.get("failed", 0)
    report.unfinished = report.runs - report.completed - report.failed
    report.branches = int(_query(client, _BRANCH_SQL, report.run_ids)[0][0])
    row = _query(client, _STEP_SQL, report.run_ids)[0]
    report.states, report.retries, report.leases_expired, report.recovered = map(int, row[:4])
    (report.duration_p50_ms, report.duration_p95_ms, report.hop_p50_ms, report.hop_p95_ms) = (
        float(v) for v in row[4:]
    )


def inspect_hints(run_id: str) -> list[str]:
    """The commands the summary suggests, runnable as printed from the same directory
    and environment (``graph`` must import the example workflow's module)."""
    return [
        f"leaseflow runs show {run_id}",
        "leaseflow runs list --workflow agent_op",
        f"LEASEFLOW_WORKFLOWS={WORKFLOW_MODULE} leaseflow graph agent_op --format mermaid",
    ]


def _print(report: DemoReport, console: Console, log_dir: Path) -> None:
    table = Table(title="leaseflow demo: agent_op", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("runs completed", f"{report.completed} / {report.runs}")
    table.add_row("runs failed", str(report.failed))
    table.add_row("runs lost (not finished)", str(report.unfinished))
    table.add_row("states executed", str(report.states))
    table.add_row("parallel branches executed", str(report.branches))
    table.add_row("retries (delivering fails once per run)", str(report.retries))
    if report.crashed:
        table.add_row("leases expired after the SIGKILL", str(report.leases_expired))
        table.add_row("runs recovered by the reaper", str(report.recovered))
    table.add_row(
        "state duration p50 / p95",
        f"{report.duration_p50_ms:.0f} / {report.duration_p95_ms:.0f} ms",
    )
    table.add_row(
        "state-to-state hop p50 / p95 (no fork, retry)",
        f"{report.hop_p50_ms:.1f} / {report.hop_p95_ms:.1f} ms",
    )
    table.add_row("wall time", f"{report.wall_s:.1f} s")
    console.print(table)
    if report.run_ids:
        console.print("Inspect a run:")
        for command in inspect_hints(report.run_ids[0]):
            console.print(f"  {command}", soft_wrap=True, highlight=False)  # copy-pastable
    if not report.ok:
        console.print(f"[red]not every run completed[/red]; process logs are in {log_dir}")
