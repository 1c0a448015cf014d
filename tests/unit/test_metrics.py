"""The engine's metrics: counted once per committed row, labelled by workflow, state
and outcome (never a run id); the off switch; the multiprocess directory."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Failed, Retry, Workflow, metrics
from leaseflow.testing import engine
from tests.helpers import ROOT


class Ctx(BaseModel):
    fail: bool = False


def _workflow() -> Workflow:
    wf = Workflow("metered", context=Ctx, register=False)

    @wf.state(initial=True, to=["last"], retry=Retry(max_attempts=2, backoff=0, jitter=0))
    def first(ctx: Any) -> str:
        if ctx.attempt == 1:
            raise ConnectionError("flaky")
        return "last"

    @wf.state()
    def last(ctx: Any) -> Complete | Failed:
        return Failed("no", code="APP-NO") if ctx.data.fail else Complete(output=1)

    return wf


def _value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_steps_runs_and_errors_are_counted_by_workflow_state_and_outcome():
    # Given the counters before
    names = [
        ("leaseflow_steps_total", {"workflow": "metered", "state": "first", "outcome": "retry"}),
        ("leaseflow_steps_total", {"workflow": "metered", "state": "first", "outcome": "next"}),
        ("leaseflow_steps_total", {"workflow": "metered", "state": "last", "outcome": "failed"}),
        ("leaseflow_step_errors_total", {"workflow": "metered", "state": "first"}),
        ("leaseflow_runs_started_total", {"workflow": "metered"}),
        ("leaseflow_runs_finished_total", {"workflow": "metered", "status": "completed"}),
        ("leaseflow_runs_finished_total", {"workflow": "metered", "status": "failed"}),
        ("leaseflow_state_latency_seconds_count", {"workflow": "metered", "state": "last"}),
    ]
    before = [_value(name, **labels) for name, labels in names]

    # When one run completes and one fails, each after a retry of its first state
    with engine() as eng:
        wf = _workflow()
        eng.start(wf)
        eng.start(wf, {"fail": True})
        eng.run_until_idle()

    # Then each row and each run was counted once, under its labels
    after = [_value(name, **labels) for name, labels in names]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2, 1, 2, 2, 1, 1, 2]
    # And no label carries a run id
    exposed = metrics.generate_latest(metrics.REGISTRY).decode()
    assert "run_id" not in exposed


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LEASEFLOW_", "PROMETHEUS"))}
    clean["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_the_off_switch_makes_every_metric_a_no_op():
    # Given a process with LEASEFLOW_METRICS=off
    code = (
        "from leaseflow import metrics\n"
        "metrics.STEPS.labels('w', 's', 'next').inc()\n"
        "metrics.STEP_SECONDS.labels('w', 's').observe(1.0)\n"
        "print(type(metrics.STEPS).__name__, metrics.ENABLED,"
        " metrics.REGISTRY.get_sample_value('leaseflow_steps_total',"
        " {'workflow': 'w', 'state': 's', 'outcome': 'next'}))\n"
    )
    # Then its metrics are no-ops and nothing is registered
    assert _python(code, LEASEFLOW_METRICS="off") == "_Noop False None"


def test_a_metrics_port_puts_the_process_in_multiprocess_mode_in_a_fresh_directory():
    # Given a process with LEASEFLOW_METRICS_PORT set (as a worker's main process),
    # where prometheus_client was imported first (the celery command imports Flower's)
    code = (
        "import os\n"
        "import prometheus_client\n"
        "from leaseflow import metrics\n"
        "metrics.STEPS.labels('w', 's', 'next').inc()\n"
        "print(metrics.MULTIPROC_DIR, metrics.multiprocess_active(),"
        " len(os.listdir(metrics.MULTIPROC_DIR)) > 0)\n"
    )
    directory, active, written = _python(code, LEASEFLOW_METRICS_PORT="9999").split()

    # Then its metrics went to files in a directory of its own, removed at its exit
    assert (active, written) == ("True", "True")
    assert "leaseflow-metrics-" in directory
    assert not os.path.exists(directory)
    # And without the port, nothing of the kind
    assert _python("from leaseflow import metrics; print(metrics.MULTIPROC_DIR)") == "None"
