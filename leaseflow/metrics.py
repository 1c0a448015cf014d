"""Prometheus metrics of the engine: the names, and how a worker serves them.

Labels are bounded: ``workflow``, ``state``, ``status``, ``outcome``, ``result``,
``hook``; never a run id. ``leaseflow_steps_total{outcome}`` counts the ``lf_steps``
rows this process wrote, by their ``outcome`` column (``next``, ``completed``,
``failed``, ``retry``, ``fork``, ``wait``, ``regathered``, ``cancelled``/``timed_out``
when a commit finds its run ended, ``released``, and beat's ``lease_expired``,
``timed_out``, ``wait_timeout``); ``leaseflow_step_errors_total`` the attempts whose
state function raised. The gauges of runs by status are computed by ``leaseflow
serve`` from the database (``leaseflow.api.routes_metrics``).

Prefork children report through prometheus-client's multiprocess mode: when
``LEASEFLOW_METRICS_PORT`` is set, importing this module (before prometheus_client is
imported anywhere) points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory of this
process, which pool children inherit; :func:`serve_worker` serves the aggregate of
all of them. ``LEASEFLOW_METRICS=off`` turns every metric call into a no-op.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any, cast

PORT_ENV = "LEASEFLOW_METRICS_PORT"
SWITCH_ENV = "LEASEFLOW_METRICS"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
ENABLED = os.environ.get(SWITCH_ENV, "on").strip().lower() not in {"off", "0", "false", "no"}


def _multiprocess_dir() -> str | None:
    """A fresh directory for this process tree's metric files (removed at its exit),
    when a metrics port is set and no directory was given; else the given one."""
    given = os.environ.get(MULTIPROC_ENV)
    if given or not os.environ.get(PORT_ENV) or not ENABLED:
        return given
    path = tempfile.mkdtemp(prefix="leaseflow-metrics-")
    os.environ[MULTIPROC_ENV] = path
    owner = os.getpid()

    def _remove() -> None:
        if os.getpid() == owner:  # not in a forked child that runs atexit handlers
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(_remove)
    return path


MULTIPROC_DIR = _multiprocess_dir()

# After the directory is set; other modules take prometheus_client's names from here.
from prometheus_client import (  # noqa: E402
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

__all__ = ["REGISTRY", "Collector", "CollectorRegistry", "GaugeMetricFamily", "generate_latest"]

if MULTIPROC_DIR and values.ValueClass is values.MutexValue:
    # prometheus_client was imported before the directory was set: the ``celery``
    # command imports its plugins first, and Flower's imports prometheus_client. Our
    # metrics (made below) go to the files all the same; metrics made earlier do not.
    values.ValueClass = values.MultiProcessValue()


class _Noop:
    """A metric that does nothing (``LEASEFLOW_METRICS=off``)."""

    def labels(self, *_: Any, **__: Any) -> _Noop:
        return self

    def inc(self, *_: Any) -> None:
        pass

    def observe(self, *_: Any) -> None:
        pass


_NOOP = _Noop()
#: Seconds: from a millisecond (an inline hop) to a minute (a backlog).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
    return Counter(name, doc, labels) if ENABLED else cast(Counter, _NOOP)


def _histogram(name: str, doc: str, labels: tuple[str, ...] = ()) -> Histogram:
    if not ENABLED:
        return cast(Histogram, _NOOP)
    return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS)


# -- claims ---------------------------------------------------------------------------
CLAIM_ATTEMPTS = _counter("leaseflow_claim_attempts_total", "Claims tried (steps and branches)")
#: result: claimed (succeeded), inline (leased by the previous commit), idle (the run
#: is past that step, or gone), lost_race (another worker holds that step), deferred
#: (not yet due: published again), version_unknown, lock_contended.
CLAIMS = _counter("leaseflow_claims_total", "Claim attempts by result", ("result",))
CLAIM_SECONDS = _histogram("leaseflow_claim_duration_seconds", "Claim statement latency")
# -- steps ----------------------------------------------------------------------------
STEPS = _counter(
    "leaseflow_steps_total", "Step rows written, by outcome", ("workflow", "state", "outcome")
)
STEP_ERRORS = _counter(
    "leaseflow_step_errors_total", "Attempts whose state function raised", ("workflow", "state")
)
BRANCHES = _counter(
    "leaseflow_branch_steps_total",
    "Committed branch attempts by status (completed, failed, retry)",
    ("workflow", "state", "status"),
)
STEP_SECONDS = _histogram(
    "leaseflow_step_duration_seconds", "Time a state function ran", ("workflow", "state")
)
STATE_LATENCY = _histogram(
    "leaseflow_state_latency_seconds",
    "From a state being due (the previous commit, or its retry's delay) to its claim",
    ("workflow", "state"),
)
JOIN_LATENCY = _histogram(
    "leaseflow_join_latency_seconds",
    "From the commit that finished a group's last branch to the join's claim",
    ("workflow", "state"),
)
LEASES_LOST = _counter(
    "leaseflow_leases_lost_total", "Commits refused: the lease was lost", ("workflow", "state")
)
RELEASED = _counter("leaseflow_leases_released_total", "Leases a worker shutting down handed back")
REGATHERED = _counter(
    "leaseflow_checkpoints_regathered_total",
    "Stale checkpoints (no upcaster path) sent to the workflow's regather state",
    ("workflow",),
)
# -- runs -----------------------------------------------------------------------------
RUNS_STARTED = _counter(
    "leaseflow_runs_started_total", "Runs whose first state was claimed", ("workflow",)
)
RUNS_FINISHED = _counter(
    "leaseflow_runs_finished_total", "Runs this process ended, by status", ("workflow", "status")
)
# -- beat -----------------------------------------------------------------------------
REAPED = _counter("leaseflow_runs_reaped_total", "Runs whose lease expired, by result", ("result",))
REDISPATCHED = _counter("leaseflow_runs_redispatched_total", "Pending runs re-published by beat")
QUEUE_PROBES = _counter(
    "leaseflow_queue_probes_total", "Probes sent through a queue before re-publishing"
)
WORKERS_REAPED = _counter("leaseflow_workers_reaped_total", "Workers found dead by beat")
LOCKS_SWEPT = _counter("leaseflow_locks_swept_total", "Expired resource locks freed by beat")
# -- hooks ----------------------------------------------------------------------------
HOOK_ERRORS = _counter("leaseflow_hook_errors_total", "Lifecycle hooks that raised", ("hook",))
HOOKS_DROPPED = _counter(
    "leaseflow_hooks_dropped_total", "Hook calls dropped: the hook queue was full", ("hook",)
)


def multiprocess_active() -> bool:
    """Are this process's metrics written to the multiprocess directory?"""
    return ENABLED and values.ValueClass is not values.MutexValue


def serve_worker(port: int, addr: str = "127.0.0.1") -> bool:
    """Serve ``/metrics`` on ``port`` from the worker's main process: the sum over it
    and every pool child (multiprocess mode). False (nothing served) when metrics are
    off, or ``LEASEFLOW_METRICS_PORT`` was not set when this module was imported."""
    if not multiprocess_active():
        return False
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(port, addr=addr, registry=registry)
    return True


def process_exited(pid: int) -> None:
    """A pool child exited: drop its live gauges (its counters stay in the sums)."""
    if multiprocess_active():
        multiprocess.mark_process_dead(pid)
