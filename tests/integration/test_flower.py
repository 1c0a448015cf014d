"""Celery's event convention: task events only from a worker run with ``-E``, and then
Flower (``leaseflow flower``) lists every state as its own task,
``leaseflow.<workflow>.<state>``, in its HTTP API."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Celery

from leaseflow.settings import Settings
from tests import helpers
from tests.helpers import eventually
from tests.workflows import basic

#: The ``leaseflow`` command of this environment.
LEASEFLOW = str(Path(sys.executable).with_name("leaseflow"))
STATES = [f"leaseflow.linear5.s{i}" for i in range(1, 6)]


class Process(helpers._Subprocess):
    """A ``leaseflow worker`` or ``leaseflow flower`` process, its output in a log file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_dir: Path, name: str) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._spawn(cmd, env)


def leaseflow_worker(settings: Settings, log_dir: Path, *args: str) -> tuple[Process, str]:
    """``leaseflow worker`` (one prefork child, no heartbeat or gossip) and its node name."""
    node = f"events-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    cmd = [LEASEFLOW, "worker", *args, "-c", "1", "-n", node]
    cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    return Process(cmd, helpers.settings_env(settings), log_dir, "worker"), node


def wait_ready(worker: Process) -> None:
    eventually(
        lambda: "ready." in worker.log() or worker.proc.poll() is not None,
        timeout=30,
        message="worker ready",
    )
    assert worker.proc.poll() is None, worker.log()[-4000:]


def send_marker(app: Celery, marker: str) -> None:
    """A ``task-sent`` event of our own: proves that a monitor is listening."""
    with app.events.default_dispatcher() as dispatcher:
        dispatcher.send("task-sent", uuid=marker, name="marker")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_tasks(port: int) -> dict[str, dict[str, Any]]:
    """Flower's ``/api/tasks`` (``{}`` while it does not answer yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tasks", timeout=2) as r:
            return dict(json.load(r))
    except OSError:
        return {}


@contextlib.contextmanager
def captured_events(app: Celery) -> Iterator[list[dict[str, Any]]]:
    """Every event on the broker while the block runs (``celery.events.EventReceiver``,
    what Flower uses); listening once the block starts, everything sent before it ends."""
    seen: list[dict[str, Any]] = []
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": seen.append})
        thread = threading.Thread(target=receiver.capture, kwargs={"limit": None}, daemon=True)
        thread.start()
        try:
            start, end = f"marker-{uuid.uuid4().hex}", f"marker-{uuid.uuid4().hex}"

            def marked(marker: str) -> bool:
                send_marker(app, marker)
                return any(e.get("uuid") == marker for e in list(seen))

            eventually(lambda: marked(start), timeout=10, interval=0.2, message="listening")
            yield seen
            eventually(lambda: marked(end), timeout=10, interval=0.2, message="all received")
        finally:
            receiver.should_stop = True
            thread.join(timeout=10)


def test_leaseflow_flower_lists_each_state_of_a_worker_run_with_dash_e(
    settings, app, client, tmp_path
):
    # Given `leaseflow flower` (not enabling events itself) and a `leaseflow worker -E`
    port = free_port()
    flower_cmd = [LEASEFLOW, "flower", f"--port={port}", "--enable_events=False"]
    env = helpers.settings_env(settings, FLOWER_UNAUTHENTICATED_API="true")
    flower = Process(flower_cmd, env, tmp_path, "flower")
    worker, node = leaseflow_worker(settings, tmp_path, "-E")
    with helpers.processes(worker, flower):
        wait_ready(worker)
        probe = f"marker-{uuid.uuid4().hex}"
        eventually(
            lambda: send_marker(app, probe) or probe in flower_tasks(port),
            timeout=20,
            interval=0.2,
            message=f"Flower listening (log: {flower.log()[-2000:]!r})",
        )

        # When a five-state run goes through the worker
        run_id = client.start(basic.linear, {"n": 1})
        assert client.wait_for(run_id, timeout=20).status == "completed"

        # Then Flower lists each state as its own succeeded task, run by that worker
        def listed() -> list[tuple[str, str, str, bool]]:
            tasks = flower_tasks(port).values()
            found = [
                (t["name"], t["state"], t["worker"], t["sent"] is not None)
                for t in tasks
                if str(t.get("uuid", "")).startswith(f"{run_id}:")
            ]
            return sorted(found)

        # (the worker sent task-sent for the states it published; the client, as
        # Celery's default, for none)
        expected = [(name, "SUCCESS", node, name != STATES[0]) for name in STATES]
        eventually(lambda: listed() == expected, timeout=15, message=f"{expected} in Flower")
    assert helpers.leaked_processes([worker, flower]) == []


def test_a_worker_without_dash_e_sends_no_task_events(settings, app, client, tmp_path):
    # Given a `leaseflow worker` without -E and a receiver of every event on the broker
    worker, node = leaseflow_worker(settings, tmp_path)
    with helpers.processes(worker):
        wait_ready(worker)
        with captured_events(app) as seen:
            # When a five-state run goes through the worker
            run_id = client.start(basic.linear, {"n": 1})
            assert client.wait_for(run_id, timeout=20).status == "completed"

    # Then no task event was sent for it, by the worker or the client
    ours = [
        (e["type"], e.get("uuid"))
        for e in seen
        if e["type"].startswith("task-")
        and (str(e.get("uuid", "")).startswith(f"{run_id}:") or e.get("hostname") == node)
    ]
    assert ours == []
    assert helpers.leaked_processes([worker]) == []
