"""``leaseflow demo`` end to end on the test database and Redis (real processes)."""

from __future__ import annotations

import io
import os

import psutil
from rich.console import Console

from leaseflow import demo


def _alive_in(groups: list[int]) -> list[psutil.Process]:
    """Live processes in any of these process groups (a worker and its pool children)."""
    alive = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) in groups and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


def test_demo_completes_every_run_and_leaves_no_process(settings):
    # Given the demo pointed at this test's database and broker
    out = io.StringIO()
    # When it runs 6 runs
    report = demo.run_demo(settings, runs=6, console=Console(file=out, width=120))
    # Then every run completed, each retried its delivery once, and nothing is left running
    assert report.ok, out.getvalue()
    assert (report.completed, report.failed, report.unfinished) == (6, 0, 0)
    assert report.retries == 6
    assert report.states == 6 * 11  # 10 moves and the fork of 'gather'
    assert report.branches == 6 * 2  # fetch_docs and fetch_memory, once each
    assert "runs completed" in out.getvalue() and "leaseflow runs show" in out.getvalue()
    assert len(report.process_groups) == 2  # a worker and a beat
    assert _alive_in(report.process_groups) == []


def test_demo_crash_recovers_every_run_through_the_reaper(settings):
    out = io.StringIO()
    report = demo.run_demo(settings, runs=4, crash=True, console=Console(file=out, width=120))
    assert report.ok, out.getvalue()
    assert report.unfinished == 0
    assert report.recovered >= 1  # the SIGKILLed runs came back through the reaper
    assert "SIGKILL" in out.getvalue() and "recovered by the reaper" in out.getvalue()
    assert len(report.process_groups) == 3  # worker1 (killed), beat, worker2
    assert _alive_in(report.process_groups) == []


def test_ctrl_c_stops_every_process_the_demo_started(settings, db, tmp_path):
    import signal
    import subprocess
    import sys

    from tests.helpers import ROOT, eventually, settings_env

    # Given a demo running from the command line (Ctrl-C reaches its process group)
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "leaseflow.cli", "demo", "--runs", "200"],
            env=settings_env(settings),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    def started() -> list[int]:
        children = psutil.Process(proc.pid).children()
        return [c.pid for c in children] if len(children) >= 2 else []

    try:
        groups = eventually(started, timeout=60, message="demo worker and beat started")
        eventually(
            lambda: db.execute("SELECT count(*) FROM lf_steps").fetchone()[0] > 0,
            timeout=60,
            message="runs under way",
        )
        # When the user presses Ctrl-C
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Then it exits as interrupted and leaves no worker or beat behind
    assert code == 130, log.read_text(errors="replace")[-3000:]
    assert "stopped" in log.read_text(errors="replace")
    assert _alive_in(groups) == []
