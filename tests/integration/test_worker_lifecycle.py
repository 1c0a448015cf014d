"""The worker registry, graceful shutdown and the dead-worker reaper with real worker
processes: SIGTERM hands a long state back at once (attempt refunded), SIGKILL's
leases are released by beat well before they would expire."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psycopg
import pytest

from leaseflow.settings import Settings
from tests.helpers import BeatProcess, WorkerProcess, eventually, processes
from tests.workflows import shutdown

TTL = 10.0  # a lease's life: recovery by expiry would take at least this long


@pytest.fixture
def lsettings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "workflows": ["tests.workflows.shutdown"],
            "lease_ttl": TTL,
            "heartbeat_interval": 0.5,
            "shutdown_grace": 1.0,
        }
    )


def claimed_by(db: psycopg.Connection, run_id: str) -> tuple[str | None, str]:
    row = db.execute("SELECT lease_owner, status FROM lf_runs WHERE id = %s", (run_id,)).fetchone()
    assert row is not None
    return row[0], row[1]


def test_sigterm_hands_a_long_state_back_and_another_worker_resumes_it(
    lsettings, client, db, store, tmp_path: Path
):
    marker = tmp_path / "done"
    first = WorkerProcess(lsettings, tmp_path, name="first")
    with processes(first):
        first.wait_ready()
        run_id = client.start(shutdown.long_job, {"marker": str(marker)})
        eventually(lambda: claimed_by(db, run_id)[1] == "running", message="grind running")
        owner = claimed_by(db, run_id)[0]
        assert owner in first.worker_ids()
        second = WorkerProcess(lsettings, tmp_path, name="second")  # only now: it idles
        with processes(second):
            second.wait_ready()
            eventually(
                lambda: any(w.id == owner and w.leases_held == 1 for w in store.list_workers()),
                message="the worker checked in with its lease",
            )
            registry = {w.id: w for w in store.list_workers()}
            assert registry[owner].status == "alive" and registry[owner].concurrency == 1
            assert lsettings.default_queue in (registry[owner].queues or "")

            t0 = time.monotonic()
            first.proc.send_signal(signal.SIGTERM)  # the main process, as KillMode=mixed
            eventually(
                lambda: claimed_by(db, run_id)[0] in second.worker_ids(),
                timeout=TTL,
                message="the second worker took the run",
            )
            handover = time.monotonic() - t0
            marker.touch()
            run = client.wait_for(run_id, 30)
            first.proc.wait(timeout=15)
            stopped_in = time.monotonic() - t0

    print(
        f"\nSIGTERM -> resumed by another worker in {handover:.2f} s (lease TTL {TTL:g} s); "
        f"first worker exited {stopped_in:.2f} s after SIGTERM"
    )
    assert handover < TTL / 2
    steps = [(s.state, s.attempt, s.outcome) for s in run.steps]
    assert steps == [("grind", 1, "released"), ("grind", 1, "next"), ("finish", 1, "completed")]
    assert owner not in {w.id for w in store.list_workers()}  # it left the registry


def test_a_killed_worker_s_leases_are_released_before_they_would_expire(
    lsettings, client, db, store, tmp_path: Path
):
    marker = tmp_path / "done"
    doomed = WorkerProcess(lsettings, tmp_path, name="doomed")
    with processes(doomed):
        doomed.wait_ready()
        run_id = client.start(shutdown.long_job, {"marker": str(marker)})
        eventually(lambda: claimed_by(db, run_id)[1] == "running", message="grind running")
        owner = claimed_by(db, run_id)[0]
        t0 = time.monotonic()
        doomed.kill()
    survivor = WorkerProcess(lsettings, tmp_path, name="survivor")
    beat = BeatProcess(lsettings, tmp_path)
    with processes(survivor, beat):
        survivor.wait_ready()
        eventually(
            lambda: claimed_by(db, run_id)[0] in survivor.worker_ids(),
            timeout=TTL * 2,
            message="the survivor took the run",
        )
        recovered = time.monotonic() - t0
        marker.touch()
        run = client.wait_for(run_id, 30)

    print(f"\nkill -9 -> resumed in {recovered:.2f} s (lease TTL {TTL:g} s)")
    assert recovered < TTL
    assert [(s.state, s.attempt, s.outcome) for s in run.steps][:2] == [
        ("grind", 1, "lease_expired"),
        ("grind", 2, "next"),
    ]
    dead = {w.id: w.status for w in store.list_workers()}
    assert dead.get(owner) == "dead"


def test_an_idle_worker_stops_at_once_on_sigterm(lsettings, client, store, tmp_path: Path):
    # Given a worker that ran a state and idles (the soak saw billiard's pool join keep
    # such a worker up ~32 s after SIGTERM)
    worker = WorkerProcess(lsettings, tmp_path, concurrency=2)
    marker = tmp_path / "done"
    marker.touch()
    with processes(worker):
        worker.wait_ready()
        assert client.wait_for(client.start(shutdown.long_job, {"marker": str(marker)})).status
        eventually(lambda: len(store.list_workers()) == 2, message="both processes checked in")
        # When it is asked to stop
        t0 = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        worker.proc.wait(timeout=30)
        stopped_in = time.monotonic() - t0
    # Then it stops within a few seconds and leaves the registry
    print(f"\nidle worker: SIGTERM -> exited in {stopped_in:.2f} s")
    assert stopped_in < 5
    assert store.list_workers() == []
