"""The beat jobs as Celery tasks, and the schedule celery beat sends them on.

Every job goes to the maintenance queue (``<default queue>.beat``), which every
leaseflow worker consumes besides its ``-Q`` queues, so a backlog of states never
delays the reaper. Each job is idempotent: two beats sending it twice are harmless.

A job sent while no worker consumes the beat queue waits there until ``expires``
(two periods) and is then discarded unrun by the worker that receives it; on
RabbitMQ the broker itself drops it then (``expiration``). So beat needs at least
one worker running: without one nothing is reaped, and the ticks that queue up
meanwhile are dropped, never run late one after another.

A tick that does nothing logs at DEBUG only: the jobs log what they act on, and
Celery's "received", "succeeded ...: 0" and "Discarding" (expired) lines of these
two tasks are lowered to DEBUG (:class:`QuietTicks`).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from celery.app import trace

from leaseflow.beat import jobs
from leaseflow.settings import Settings
from leaseflow.tasks import dispatch, runtime

REAP_TASK = "leaseflow.beat.reap"
DISPATCH_TASK = "leaseflow.beat.dispatch"
TIMEOUTS_TASK = "leaseflow.beat.timeouts"
LOCKS_TASK = "leaseflow.beat.locks"
RETENTION_TASK = "leaseflow.beat.retention"
PROBE_TASK = dispatch.PROBE_TASK
#: The periodic jobs whose idle ticks Celery logs at DEBUG only.
TICK_TASKS = frozenset({REAP_TASK, DISPATCH_TASK, TIMEOUTS_TASK, LOCKS_TASK, RETENTION_TASK})
#: Celery's loggers of a task's "received", "succeeded" and "Discarding" lines.
CELERY_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.worker.request")
#: Celery's line for a message it drops unrun (expired or revoked).
DISCARDED = "Discarding revoked task: %s[%s]"


class QuietTicks(logging.Filter):
    """Lowers Celery's INFO lines about a beat job that did nothing to DEBUG (dropped
    unless DEBUG is on): "Task ... received", "Task ... succeeded in ...s: 0", and
    "Discarding revoked task" for an expired tick. The lines of every other task,
    and the "succeeded" line of a tick that re-published runs, keep their level; a
    tick's own actions are logged by ``beat.jobs``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not _idle_tick(record):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return True


def _idle_tick(record: logging.LogRecord) -> bool:
    if record.msg == DISCARDED:
        return isinstance(record.args, tuple) and bool(record.args) and record.args[0] in TICK_TASKS
    data = getattr(record, "data", None)
    if not isinstance(data, dict) or data.get("name") not in TICK_TASKS:
        return False
    if record.msg == trace.LOG_RECEIVED:
        return True
    return record.msg == trace.LOG_SUCCESS and data.get("return_value") == "0"


def quiet_ticks() -> None:
    """Install :class:`QuietTicks` on Celery's task loggers (once per process)."""
    for name in CELERY_TASK_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietTicks) for f in logger.filters):
            logger.addFilter(QuietTicks())


def schedule(settings: Settings) -> dict[str, Any]:
    """Celery's ``beat_schedule`` for ``settings``: the reaper, the dispatcher and the
    timeout sweeper (wait timeouts, timers, run deadlines), the lock sweeper, and the
    retention purge when ``LEASEFLOW_RETENTION`` is set."""

    def entry(task: str, every: float) -> dict[str, Any]:
        return {
            "task": task,
            "schedule": timedelta(seconds=every),
            # A job older than two periods is dropped: the next one does its work.
            # ``expires`` makes the worker discard it; ``expiration`` (a per-message
            # TTL) makes RabbitMQ drop it while no worker consumes the queue.
            "options": {
                "expires": max(1.0, every * 2),
                "expiration": max(1.0, every * 2),
                "queue": settings.maintenance_queue,
            },
        }

    entries = {
        "leaseflow-reaper": entry(REAP_TASK, settings.reaper_interval),
        "leaseflow-dispatcher": entry(DISPATCH_TASK, settings.dispatch_interval),
        "leaseflow-timeouts": entry(TIMEOUTS_TASK, settings.timeout_interval),
        "leaseflow-lock-sweeper": entry(LOCKS_TASK, settings.lock_sweep_interval),
    }
    if settings.retention is not None:  # beat's own setting travels with the job
        purge = entry(RETENTION_TASK, settings.retention_interval)
        entries["leaseflow-retention"] = {**purge, "args": (settings.retention,)}
    return entries


def register(app: Celery) -> None:
    """Register the beat jobs' tasks on ``app``, and quiet their idle ticks' lines."""
    quiet_ticks()

    @app.task(name=REAP_TASK, ignore_result=True, shared=False)
    def reap() -> int:
        engine = runtime.get()
        jobs.reap_dead_workers(
            engine.store, self_id=engine.worker_id, after=engine.settings.dead_after
        )
        found = jobs.reap(engine.store, limit=engine.settings.dispatch_batch)
        dispatch.publish_all(app, found)
        return len(found)

    @app.task(name=TIMEOUTS_TASK, ignore_result=True, shared=False)
    def timeouts() -> int:
        engine = runtime.get()
        found = jobs.sweep_timeouts(engine.store, limit=engine.settings.dispatch_batch)
        dispatch.publish_all(app, found)
        return len(found)

    @app.task(name=LOCKS_TASK, ignore_result=True, shared=False)
    def lock_sweeper() -> int:
        engine = runtime.get()
        return jobs.sweep_locks(engine.store, limit=engine.settings.dispatch_batch)

    @app.task(name=RETENTION_TASK, ignore_result=True, shared=False)
    def retention(older_than: float | None = None) -> int:
        """Purge runs finished more than ``older_than`` seconds ago (beat's
        ``LEASEFLOW_RETENTION``; without it, the worker's)."""
        engine = runtime.get()
        age = engine.settings.retention if older_than is None else older_than
        if age is None:
            return 0
        return jobs.purge_finished(engine.store, older_than=age).runs

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
