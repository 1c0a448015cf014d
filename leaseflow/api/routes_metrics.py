"""``GET /metrics``: Prometheus text of this serve process, with gauges of runs by
status computed from the database.

Unauthenticated, like ``/healthz``, so that Prometheus scrapes it without a token:
it carries aggregate counts under bounded labels (workflow, state, status), never a
run id, a tenant, an input or an error text. (``leaseflow serve`` refuses a public
bind until a token exists; a deployment that must hide even its workflow names
scrapes on a private network.) Each ``serve --workers`` process answers for itself;
the engine's counters are served by the workers (``LEASEFLOW_METRICS_PORT``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import Response

from leaseflow import metrics
from leaseflow.settings import Settings

router = APIRouter(tags=["metrics"])
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: In-flight runs through the partial index ix_lf_runs_unfinished (finished_at IS NULL).
ACTIVE_SQL = """
SELECT workflow, state, status, count(*) FROM lf_runs
 WHERE finished_at IS NULL GROUP BY workflow, state, status
"""
#: Finished runs through ix_lf_runs_finished (finished_at IS NOT NULL).
FINISHED_SQL = """
SELECT workflow, status, count(*) FROM lf_runs
 WHERE finished_at IS NOT NULL GROUP BY workflow, status
"""


class RunGauges(metrics.Collector):
    """``leaseflow_runs{workflow,status}`` and ``leaseflow_runs_waiting{workflow,state}``.

    Cheap at scrape time, by design: in-flight runs (pending, running, waiting) are
    counted through the partial index of unfinished runs, so the cost follows what is
    in flight, not the table; refreshed at most every ``active_ttl`` seconds. Finished
    runs (completed, failed, cancelled, timed_out) only grow, and counting them reads
    every finished row (bounded by ``LEASEFLOW_RETENTION``), so that count is cached
    for ``finished_ttl`` seconds: a scrape every 15 s costs one such scan a minute at
    most. Both run under a 2 s statement timeout; when the database does not answer,
    the last values are served (none before the first answer).
    """

    def __init__(
        self, settings: Settings, *, active_ttl: float = 5.0, finished_ttl: float = 60.0
    ) -> None:
        self._url = settings.libpq_url
        self._ttl = {"active": active_ttl, "finished": finished_ttl}
        self._rows: dict[str, Sequence[tuple[Any, ...]]] = {"active": (), "finished": ()}
        self._at = {"active": -1e9, "finished": -1e9}
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        now = time.monotonic()
        stale = [k for k in self._rows if now - self._at[k] >= self._ttl[k]]
        if not stale:
            return
        try:
            with psycopg.connect(
                self._url, connect_timeout=2, autocommit=True, options="-c statement_timeout=2000"
            ) as conn:
                for kind in stale:
                    sql = ACTIVE_SQL if kind == "active" else FINISHED_SQL
                    self._rows[kind] = conn.execute(sql).fetchall()
                    self._at[kind] = now
        except psycopg.Error:
            return  # the last values stand; /readyz says what is wrong

    def collect(self) -> Iterator[metrics.GaugeMetricFamily]:
        with self._lock:
            self._refresh()
            active, finished = self._rows["active"], self._rows["finished"]
        runs = metrics.GaugeMetricFamily(
            "leaseflow_runs", "Runs by status (from the database)", labels=["workflow", "status"]
        )
        waiting = metrics.GaugeMetricFamily(
            "leaseflow_runs_waiting", "Waiting runs by state", labels=["workflow", "state"]
        )
        by_status: dict[tuple[str, str], int] = {}
        for workflow, state, status, count in active:
            by_status[(workflow, status)] = by_status.get((workflow, status), 0) + count
            if status == "waiting":
                waiting.add_metric([workflow, state], count)
        for workflow, status, count in finished:
            by_status[(workflow, status)] = by_status.get((workflow, status), 0) + count
        for (workflow, status), count in sorted(by_status.items()):
            runs.add_metric([workflow, status], count)
        yield runs
        yield waiting


def _gauges(request: Request) -> metrics.CollectorRegistry:
    state = request.app.state
    registry = getattr(state, "metrics_registry", None)
    if registry is None:
        registry = metrics.CollectorRegistry(auto_describe=False)
        registry.register(RunGauges(request.app.state.engine.settings))
        state.metrics_registry = registry
    return registry


@router.get("/metrics", include_in_schema=False)
def scrape(request: Request) -> Response:
    """Prometheus exposition: this process's metrics, then the runs by status."""
    own = metrics.generate_latest(metrics.REGISTRY) if metrics.ENABLED else b""
    return Response(own + metrics.generate_latest(_gauges(request)), media_type=CONTENT_TYPE)
