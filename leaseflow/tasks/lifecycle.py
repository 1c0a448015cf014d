"""A worker's life: it checks in to the registry from every pool process, and on a
warm shutdown it hands back what it will not finish.

SIGTERM starts Celery's warm shutdown: no new message is taken and the running states
finish. They get ``LEASEFLOW_SHUTDOWN_GRACE`` seconds; then the leases of the states
still running are handed back (pending at once, attempt refunded, a ``released``
step logged), their wake-ups published for another worker, and the worker turns the
warm shutdown into a cold one (SIGQUIT to itself), which stops the pool at once.
Once nothing runs any more it does so without waiting out the grace either: billiard's
pool join could otherwise keep an idle worker alive for tens of seconds. Pool processes
that stop cleanly leave the registry.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import threading
import time
from typing import Any

from celery import signals
from celery.worker import state as worker_state

from leaseflow import logs, messages, metrics
from leaseflow.settings import get_settings
from leaseflow.store import records
from leaseflow.tasks import dispatch, runtime

#: After the last running state ended, how long the warm shutdown may take by itself.
IDLE_EXIT = 1.0
_controller: Any = None


def remember(controller: Any) -> None:
    """At worker start (main process, before the fork): the controller, and what the
    registry should know of the worker (its queues and pool size)."""
    global _controller
    _controller = controller
    queues = tuple(sorted(q.name for q in controller.app.amqp.queues.consume_from.values()))
    runtime.worker_info = records.WorkerInfo(queues, getattr(controller, "concurrency", None))


def _pool_pids(controller: Any) -> list[int]:
    pool = getattr(controller, "pool", None)
    inner = getattr(pool, "_pool", None)
    processes = getattr(inner, "_pool", None) or []
    return [p.pid for p in processes if getattr(p, "pid", None)]


def hand_back(controller: Any) -> records.Released:
    """Release the leases of the pool processes' running states, publish their runs
    again, and forget the processes in the registry."""
    host = socket.gethostname()
    owners = [f"{host}:{pid}" for pid in _pool_pids(controller)]
    store = runtime.get().store
    released = store.release_leases_of(owners)
    wakeups: list[messages.Message] = [due.wakeup() for due in released.runs]
    wakeups += [due.wakeup() for due in released.branches]
    for due in released.runs:
        metrics.RELEASED.inc()
        metrics.STEPS.labels(due.workflow, due.state, "released").inc()
        logs.warning(
            "lease_released",
            run_id=due.run_id,
            state=due.state,
            reason="shutdown",
            step_seq=due.step_seq,
            workflow=due.workflow,
        )
    if wakeups:
        dispatch.publish_all(controller.app, wakeups)
    store.forget_workers(owners)
    # A pool process's heartbeat may check it in again before the cold shutdown stops
    # it: forget them once more when this (main) process exits, the pool gone.
    atexit.register(_forget_quietly, owners)
    return released


def _forget_quietly(owners: list[str]) -> None:
    with contextlib.suppress(Exception):
        runtime.get().store.forget_workers(owners)


def _watch(controller: Any, grace: float) -> None:
    """The warm shutdown's watchdog (a thread of the main process)."""
    deadline = time.monotonic() + grace
    idle_since: float | None = None
    while time.monotonic() < deadline:
        if worker_state.active_requests:
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= IDLE_EXIT:
            break
        time.sleep(0.1)
    else:
        logs.warning("shutdown_grace_over", grace=grace, running=len(worker_state.active_requests))
    try:
        hand_back(controller)
    except Exception as exc:  # the leases expire and the reaper hands them on instead
        logs.warning("hand_back_failed", error=repr(exc))
    logs.info("worker_stopping", pid=os.getpid())
    os.kill(os.getpid(), signal.SIGQUIT)  # a cold shutdown: the pool stops now


@signals.worker_shutting_down.connect
def _on_shutting_down(sig: Any = None, how: Any = None, exitcode: Any = None, **_: Any) -> None:
    controller = _controller
    if controller is None or how != "Warm":
        return
    grace = runtime.get().settings.shutdown_grace
    threading.Thread(
        target=_watch, args=(controller, grace), name="leaseflow-shutdown", daemon=True
    ).start()


@signals.worker_ready.connect
def _on_ready(**_: Any) -> None:
    """The main process serves the metrics of itself and its pool processes, once they
    are forked (so that none inherits the listening socket)."""
    port = get_settings().metrics_port if _controller is not None else None
    if port is None:
        return
    host = get_settings().metrics_host
    if metrics.serve_worker(port, host):
        logs.info("metrics_served", port=port, host=host, directory=metrics.MULTIPROC_DIR)
    else:
        logs.warning(
            "metrics_not_served",
            port=port,
            reason="LEASEFLOW_METRICS=off, or LEASEFLOW_METRICS_PORT was not in the "
            "environment when leaseflow was imported (multiprocess mode is off)",
        )


@signals.worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    """A pool process checks in at once, and keeps checking in while idle."""
    if _controller is None:
        return
    with contextlib.suppress(Exception):  # the first state's claim will try again
        runtime.get().keeper.start()


@signals.worker_process_shutdown.connect
def _on_process_shutdown(**_: Any) -> None:
    if _controller is None:
        return
    with contextlib.suppress(Exception):
        engine = runtime.get()
        engine.keeper.stop()
        engine.store.forget_workers([engine.worker_id])
    metrics.process_exited(os.getpid())
