"""JSON logs (LEASEFLOW_LOG_FORMAT=json): one run's life rebuilt from its log lines
alone, those of a real worker and of the client that started and signalled it."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from leaseflow import logfmt, logs
from leaseflow.client import Client
from leaseflow.settings import Settings
from tests.helpers import WorkerProcess, eventually, processes
from tests.workflows import observed

WORKFLOWS = ["tests.workflows.basic", "tests.workflows.observed"]
JSON_ENV = {"LEASEFLOW_LOG_FORMAT": "json", "LEASEFLOW_LOG_LEVEL": "DEBUG"}


@pytest.fixture
def wsettings(settings: Settings) -> Settings:
    return settings.model_copy(update={"workflows": WORKFLOWS})


@contextlib.contextmanager
def json_lines_of_this_process() -> Iterator[io.StringIO]:
    """The ``leaseflow`` logger of this process (the client's lines) as JSON, restored after."""
    logger, out = logs.logger, io.StringIO()
    level, propagate = logger.level, logger.propagate
    logfmt.configure(Settings(log_format="json", log_level="DEBUG"), stream=out)
    try:
        yield out
    finally:
        for handler in [h for h in logger.handlers if h.get_name() == logfmt.HANDLER_NAME]:
            logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def waiting_in(client: Client, run_id: str) -> str | None:
    """The state the run waits in (a Parallel's parent waits too, for its join)."""
    run = client.get(run_id)
    return run.state if run.status == "waiting" else None


def lines_of(text: str, run_id: str) -> list[dict[str, Any]]:
    """Every line naming ``run_id``, parsed: each must be one JSON object."""
    found = []
    for line in text.splitlines():
        if run_id in line:
            doc = json.loads(line)  # a console line here would fail the test
            assert isinstance(doc, dict), line
            found.append(doc)
    return found


def steps_from(lines: list[dict[str, Any]]) -> list[tuple[int, str, str, str | None]]:
    """The run's steps ``(step_seq, state, outcome, lease_token)``, from its lines alone.

    A worker's commit is one ``step_committed`` line. A signal that resumed the run is
    a step too (written by the client's transaction): the resumed run's next step is
    ``step_seq``, so the signal's was the one before, at the state whose commit just
    before made the run wait (its ``run_waiting`` line).
    """
    steps: list[tuple[int, str, str, str | None]] = []
    waits = {d["step_seq"]: d["state"] for d in lines if d["action"] == "run_waiting"}
    for doc in lines:
        if doc["action"] == "step_committed":
            steps.append((doc["step_seq"], doc["state"], doc["outcome"], doc["lease_token"]))
        elif doc["action"] == "signal_received" and doc["result"] == "resumed":
            resumed_at = doc["step_seq"] - 1  # the wait's commit was the step before
            steps.append((resumed_at, waits[resumed_at - 1], "signalled", None))
    return sorted(steps)


def test_a_runs_life_is_rebuilt_from_its_json_log_lines(
    wsettings: Settings, client: Client, db: psycopg.Connection, tmp_path: Path
):
    # Given a worker logging JSON at DEBUG (Celery's own lines at WARNING only), and
    # this process's client lines as JSON too
    worker = WorkerProcess(wsettings, tmp_path, env=JSON_ENV, extra_args=("-l", "WARNING"))
    with processes(worker), json_lines_of_this_process() as client_log:
        worker.wait_log('"action": "worker_ready"')

        # When a run retries a state, forks a Parallel, joins, waits and is signalled
        run_id = client.start(observed.life, {"width": 2})
        eventually(lambda: waiting_in(client, run_id) == "approve", message="run waiting")
        assert client.signal(run_id, "go", {"ok": True}).result == "resumed"
        assert client.wait_for(run_id, timeout=30).status == "completed"
        eventually(
            lambda: '"action": "run_finished"' in worker.log(), message="run_finished logged"
        )
    lines = lines_of(worker.log(), run_id) + lines_of(client_log.getvalue(), run_id)

    # Then every line of the run is JSON with its action, the run and its workflow
    for doc in lines:
        assert {"ts", "level", "logger", "action", "message"} <= doc.keys(), doc
        assert (doc["run_id"], doc["workflow"]) == (run_id, "logs_life"), doc
    actions = {doc["action"] for doc in lines}
    assert {"run_started", "state_retry", "run_forked", "branch_committed"} <= actions
    assert {"run_waiting", "signal_received", "run_finished"} <= actions
    # And the steps rebuilt from them are the run's step log, leases included
    logged = steps_from(lines)
    stored = db.execute(
        "SELECT seq, state, outcome, lease_token::text FROM lf_steps WHERE run_id = %s"
        " ORDER BY seq",
        (run_id,),
    ).fetchall()
    assert logged == [tuple(row) for row in stored]
    assert [state for _, state, _, _ in logged] == [
        "charge",
        "charge",
        "fan",
        "joined",
        "approve",
        "approve",
        "done",
    ]
