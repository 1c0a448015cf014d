"""Resource locks with real workers: two workflows and a ``locks.hold`` caller
contending for three keys never overlap, fences grow; a forced release fences the
holder out; the CLI lists and releases locks."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import psycopg
import pytest

from leaseflow import locks
from leaseflow.settings import Settings
from tests.helpers import BeatProcess, WorkerProcess, eventually, processes
from tests.workflows import locks as lockflows

WORKFLOWS = ["tests.workflows.basic", "tests.workflows.locks"]
KEYS = ["k1", "k2", "k3"]


@pytest.fixture
def lsettings(settings: Settings, db: psycopg.Connection) -> Settings:
    db.execute(lockflows.LEDGER)
    return settings.model_copy(update={"workflows": WORKFLOWS})


def overlaps(db: psycopg.Connection) -> list[str]:
    """Every pair of holders of one key whose [enter, exit] intervals overlap, and every
    fence that did not grow; [] when the ledger is sound."""
    rows = db.execute(
        "SELECT key, fence, holder, event FROM lock_ledger ORDER BY at, id"
    ).fetchall()
    inside: dict[str, tuple[str, int]] = {}
    last_fence: dict[str, int] = {}
    problems = []
    for key, fence, holder, event in rows:
        if event == "enter":
            if key in inside:
                problems.append(f"{holder} entered {key} while {inside[key][0]} held it")
            if fence <= last_fence.get(key, 0):
                problems.append(f"{holder} entered {key} with fence {fence} <= {last_fence[key]}")
            inside[key], last_fence[key] = (holder, fence), fence
        elif inside.get(key, ("", 0))[0] == holder:
            del inside[key]
    return problems


def test_runs_of_two_workflows_and_a_caller_never_hold_one_key_together(
    lsettings, client, db, store, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("LEASEFLOW_DATABASE_URL", lsettings.database_url or "")
    workers = [WorkerProcess(lsettings, tmp_path, name=f"w{i}", concurrency=2) for i in (1, 2)]
    stop = threading.Event()
    held_by_caller: list[int] = []

    def caller() -> None:
        while not stop.is_set():
            for key in KEYS:
                try:
                    with locks.hold(
                        f"res:{key}", holder="cli", ttl=5, max_wait=2, store=store
                    ) as lock:
                        lockflows.write(key, lock.token, "cli", "enter")
                        held_by_caller.append(lock.token)
                        lockflows.write(key, lock.token, "cli", "exit")
                except Exception:
                    continue

    with processes(*workers):
        for worker in workers:
            worker.wait_ready()
        thread = threading.Thread(target=caller, daemon=True)
        thread.start()
        runs = [
            client.start(lockflows.lock_a if i % 2 else lockflows.lock_b, {"key": KEYS[i % 3]})
            for i in range(50)
        ]
        try:
            for run_id in runs:
                assert client.wait_for(run_id, 60).status == "completed"
        finally:
            stop.set()
            thread.join(timeout=30)

    assert overlaps(db) == []
    entered = db.execute(
        "SELECT count(*) FILTER (WHERE holder <> 'cli'), count(*) FILTER (WHERE holder = 'cli')"
        "  FROM lock_ledger WHERE event = 'enter'"
    ).fetchone()
    assert entered[0] == 50 and entered[1] >= 1
    assert held_by_caller
    attempts = db.execute("SELECT max(attempt) FROM lf_runs").fetchone()
    assert attempts == (1,)  # contention never spent an attempt
    assert store.list_locks() == []


def test_a_forced_release_is_audited_and_the_holder_cannot_commit(
    lsettings, client, db, store, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("LEASEFLOW_DATABASE_URL", lsettings.database_url or "")
    worker = WorkerProcess(lsettings, tmp_path)
    beat = BeatProcess(lsettings, tmp_path)  # its reaper hands the refused run on
    with processes(worker, beat):
        worker.wait_ready()
        run_id = client.start(lockflows.lock_a, {"key": "slow", "hold": 1.5})
        eventually(
            lambda: (
                db.execute("SELECT count(*) FROM lock_ledger WHERE event = 'enter'").fetchone()[0]
                == 1
            ),
            message="the state entered",
        )
        freed = store.force_release("res:slow", actor="ops", reason="test")
        run = client.wait_for(run_id, 60)
        log = worker.log()

    assert freed.holder_run == run_id
    assert "lease_lost" in log  # the holder's guarded commit was refused
    assert run.status == "completed"
    steps = [(s.state, s.attempt, s.outcome) for s in run.steps]
    assert steps[:2] == [("critical", 1, "lease_expired"), ("critical", 2, "next")]
    audit = store.lock_audit("res:slow")
    assert [(a.action, a.actor, a.reason) for a in audit] == [("forced", "ops", "test")]
    fences = [
        f for (f,) in db.execute("SELECT fence FROM lock_ledger WHERE event = 'enter' ORDER BY id")
    ]
    assert fences == [1, 2]


def test_locks_list_and_release_on_the_command_line(lsettings, store, monkeypatch):
    from click.testing import CliRunner

    from leaseflow import cli as leaseflow_cli
    from leaseflow.settings import reset_settings

    for name, value in {
        "LEASEFLOW_DATABASE_URL": lsettings.database_url or "",
        "LEASEFLOW_BROKER_URL": lsettings.broker_url or "",
        "LEASEFLOW_DEFAULT_QUEUE": lsettings.default_queue,
        "LEASEFLOW_WORKFLOWS": "tests.workflows.basic",
    }.items():
        monkeypatch.setenv(name, value)
    reset_settings()

    def cli(*args: str):
        return CliRunner().invoke(leaseflow_cli.main, list(args), prog_name="leaseflow")

    try:
        held = store.acquire_lock("index:acme", holder="reindex-cli", ttl=60)
        listed = cli("locks", "list", "--json")
        assert listed.exit_code == 0, listed.output
        (row,) = json.loads(listed.stdout)
        assert (row["key"], row["holder"], row["fence"]) == ("index:acme", "reindex-cli", 1)
        assert "index:acme" in cli("locks", "list").stdout

        refused = cli("locks", "release", "index:acme", "--reason", "stuck")
        assert refused.exit_code == 2 and "--force" in refused.stderr
        released = cli("locks", "release", "index:acme", "--force", "--reason", "stuck")
        assert released.exit_code == 0, released.output
        assert "released lock 'index:acme' (fence 1) from reindex-cli" in released.stdout
        assert not store.refresh_lock("index:acme", held.token, ttl=60)  # fenced out

        store.heartbeat([], worker="vm:4242", ttl=60)
        workers = cli("workers", "list", "--json")
        assert [w["id"] for w in json.loads(workers.stdout)] == ["vm:4242"]
        assert "vm:4242" in cli("workers", "list").stdout

        unknown = cli("locks", "release", "nope", "--force", "--reason", "x")
        assert unknown.exit_code == 1
        assert unknown.stderr.startswith("error[E-LOCK-NOT-FOUND]: no lock 'nope' is held")
    finally:
        reset_settings()
