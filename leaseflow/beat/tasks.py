"""The beat jobs as Celery tasks, and the schedule celery beat sends them on.

Every job goes to the maintenance queue (``<default queue>.beat``), which every
leaseflow worker consumes besides its ``-Q`` queues, so a backlog of states never
delays the reaper. Each job is idempotent: two beats sending it twice are harmless.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from celery import Celery

from leaseflow.beat import jobs
from leaseflow.settings import Settings
from leaseflow.tasks import dispatch, runtime

REAP_TASK = "leaseflow.beat.reap"
DISPATCH_TASK = "leaseflow.beat.dispatch"
PROBE_TASK = dispatch.PROBE_TASK


def schedule(settings: Settings) -> dict[str, Any]:
    """Celery's ``beat_schedule`` for ``settings``: the reaper and the dispatcher."""

    def entry(task: str, every: float) -> dict[str, Any]:
        return {
            "task": task,
            "schedule": timedelta(seconds=every),
            # A job older than two periods is dropped: the next one does its work.
            "options": {"expires": max(1.0, every * 2), "queue": settings.maintenance_queue},
        }

    return {
        "leaseflow-reaper": entry(REAP_TASK, settings.reaper_interval),
        "leaseflow-dispatcher": entry(DISPATCH_TASK, settings.dispatch_interval),
    }


def register(app: Celery) -> None:
    """Register the beat jobs' tasks on ``app``."""

    @app.task(name=REAP_TASK, ignore_result=True, shared=False)
    def reap() -> int:
        engine = runtime.get()
        found = jobs.reap(engine.store, limit=engine.settings.dispatch_batch)
        dispatch.publish_all(app, found)
        return len(found)

    @app.task(name=DISPATCH_TASK, ignore_result=True, shared=False)
    def redispatch() -> int:
        return _redispatch(app, probe=True)

    @app.task(name=PROBE_TASK, ignore_result=True, shared=False)
    def queue_probe(queue: str, sent_at: str) -> int:
        """Came through ``queue``: everything published there before ``sent_at`` has
        been delivered, so what is still pending from before it is lost; re-publish it
        now (see ``jobs.dispatch_overdue``)."""
        runtime.get().store.probe_passed(queue, datetime.fromisoformat(sent_at))
        return _redispatch(app, probe=False)


def _redispatch(app: Celery, *, probe: bool) -> int:
    engine = runtime.get()
    default = app.conf.task_default_queue
    found = jobs.dispatch_overdue(
        engine.store,
        lambda workflow, state: dispatch.queue_for(workflow, state, default),
        limit=engine.settings.dispatch_batch,
        probe=probe,
    )
    dispatch.publish_all(app, found.wakeups)
    for sent in found.probes:
        dispatch.publish_probe(app, sent.queue, sent.sent_at)
    return len(found.wakeups)
