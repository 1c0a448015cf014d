"""Issue 21, point 1: after a workload of 200 runs with retries and a Parallel on a real
prefork worker (-c 2, ``LEASEFLOW_METRICS_PORT`` set), a scrape of the worker's port
and of ``leaseflow serve``'s ``/metrics`` agrees with the database.

What is compared, exactly: ``leaseflow_steps_total{workflow,state,outcome}`` with the
``lf_steps`` rows by the run's workflow, the step's state and outcome (every row: no
beat runs here, so the worker wrote them all); ``leaseflow_runs_finished_total`` and
``leaseflow_runs_started_total`` with ``lf_runs`` by workflow (and status); the
branches completed with ``lf_branches``; serve's gauge ``leaseflow_runs`` with
``lf_runs`` by workflow and status. The pool processes each counted their own steps
(two distinct step owners), so equality means the port serves their sum.
"""

from __future__ import annotations

import socket
import urllib.request
from collections import Counter
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from leaseflow.api.app import create_app
from leaseflow.client import Client
from tests.helpers import WorkerProcess, eventually, processes
from tests.workflows import basic, fanout

RUNS = 200
WORKFLOWS = ["tests.workflows.basic", "tests.workflows.fanout"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _samples(text: str, name: str) -> Counter[tuple[str, ...]]:
    """``{label values in label-name order: value}`` of the samples called ``name``."""
    found: Counter[tuple[str, ...]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.value:
                found[tuple(v for _, v in sorted(sample.labels.items()))] += sample.value
    return found


def _start_workload(client: Client) -> None:
    """200 runs: retries that recover, retries that run out, a business failure, an
    on_error fallback, and Parallels with a branch that fails its first attempt."""
    for i in range(RUNS):
        kind = i % 10
        if kind < 4:
            client.start(basic.flaky, {"fail_times": 1})  # one retry, completes
        elif kind == 4:
            client.start(basic.flaky, {"fail_times": 3})  # out of attempts: failed
        elif kind == 5:
            client.start(basic.flaky, {"mode": "fail"})  # Failed(...)
        elif kind == 6:
            client.start(basic.recovering)  # on_error: fallback
        else:
            client.start(fanout.parallel, {"width": 3, "flaky_index": 1})


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def _database_counts(db: Any) -> dict[str, Counter[tuple[str, ...]]]:
    steps = db.execute(
        "SELECT s.outcome, s.state, r.workflow, count(*) FROM lf_steps s"
        " JOIN lf_runs r ON r.id = s.run_id GROUP BY 1, 2, 3"
    ).fetchall()
    runs = db.execute("SELECT status, workflow, count(*) FROM lf_runs GROUP BY 1, 2").fetchall()
    branches = db.execute(
        "SELECT b.state, 'completed', r.workflow, count(*) FROM lf_branches b"
        " JOIN lf_runs r ON r.id = b.run_id WHERE b.status = 'completed' GROUP BY 1, 3"
    ).fetchall()
    started = db.execute("SELECT workflow, count(*) FROM lf_runs GROUP BY 1").fetchall()
    return {
        # label values sorted by label name: (outcome, state, workflow), (status, workflow)
        "steps": Counter({tuple(row[:3]): row[3] for row in steps}),
        "runs": Counter({tuple(row[:2]): row[2] for row in runs}),
        "branches": Counter({(row[0], row[1], row[2]): row[3] for row in branches}),
        "started": Counter({(row[0],): row[1] for row in started}),
    }


@pytest.mark.timeout(300)
def test_worker_and_serve_metrics_agree_with_the_database(settings, app, db, tmp_path):
    # Given a prefork worker of two pool processes serving its metrics on a port
    port = _free_port()
    config = settings.model_copy(update={"workflows": WORKFLOWS, "metrics_port": port})
    worker = WorkerProcess(config, tmp_path, name="w1", concurrency=2)
    with processes(worker), Client(settings=config) as client:
        worker.wait_ready()
        worker.wait_log("metrics_served")

        # When 200 runs with retries and Parallels have all finished
        _start_workload(client)
        finished = "SELECT count(*) FROM lf_runs WHERE finished_at IS NOT NULL"
        eventually(
            lambda: db.execute(finished).fetchone()[0] == RUNS,
            timeout=180,
            interval=0.25,
            message="all runs finished",
        )
        expected = _database_counts(db)

        # Then the worker's port agrees with the database, count for count (polled: the
        # last counters are bumped just after the last commit)
        last: dict[str, Any] = {}

        def agrees() -> bool:
            text = last["text"] = _scrape(port)
            branches = _samples(text, "leaseflow_branch_steps_total")
            found = {
                "steps": _samples(text, "leaseflow_steps_total"),
                "runs": _samples(text, "leaseflow_runs_finished_total"),
                "branches": Counter({k: v for k, v in branches.items() if k[1] == "completed"}),
                "started": _samples(text, "leaseflow_runs_started_total"),
            }
            last["found"] = found
            return found == expected

        try:
            eventually(agrees, timeout=20, interval=0.2, message="the worker's metrics agree")
        except AssertionError:
            assert last.get("found") == expected  # the difference, shown
            raise
        text = last["text"]

        # And both pool processes did steps, so the port served their sum
        owners = db.execute("SELECT count(DISTINCT worker) FROM lf_steps").fetchone()[0]
        assert owners == 2

    # And the workload had what it was meant to: retries, failures, a fallback, branches
    outcomes = {key[0] for key in expected["steps"]}
    assert {"retry", "failed", "next", "completed", "fork"} <= outcomes
    assert {key[0] for key in expected["runs"]} == {"completed", "failed"}
    assert sum(_samples(text, "leaseflow_step_errors_total").values()) > 0
    assert _samples(text, "leaseflow_step_duration_seconds_count")
    assert _samples(text, "leaseflow_state_latency_seconds_count")
    assert _samples(text, "leaseflow_join_latency_seconds_count")
    assert "run_id" not in text

    # And serve's /metrics shows the runs by status computed from the database
    with TestClient(create_app(config), client=("127.0.0.1", 50000)) as http:
        response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert _samples(response.text, "leaseflow_runs") == expected["runs"]
    assert "run_id" not in response.text
