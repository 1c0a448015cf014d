"""One Celery task per state: a thin adapter that runs the step and publishes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery, Task, bootsteps

from leaseflow import faults
from leaseflow.fsm.definition import StateSpec, Workflow
from leaseflow.tasks import dispatch, runtime


def register(app: Celery, wf: Workflow, spec: StateSpec) -> None:
    """Register the task ``leaseflow.<workflow>.<state>`` on ``app`` (once per name)."""
    name = wf.task_name(spec.name)
    if name in app.tasks:
        return  # another version declared the same state: one task serves them all
    options: dict[str, Any] = {"name": name, "bind": True, "ignore_result": True, "shared": False}
    # No task-level ``queue`` (deprecated in Celery 5.7) nor time limits: one task serves
    # the state in every version, so tasks/dispatch.py, the only publisher, routes each
    # message to its version's queue and gives it its version's limits.
    workflow, state = wf.name, spec.name

    def run_state(task: Task, run_id: str, step_seq: int) -> str:
        result = runtime.get().runner.run_step(
            str(run_id), int(step_seq), workflow=workflow, state=state
        )
        if result.fork is not None:
            dispatch.publish_fork(task.app, result.fork)
        dispatch.publish_all(task.app, result.wakeups)
        # Celery logs this in its "succeeded" line: the task succeeded when the step
        # committed, whatever the step decided (the runner logs retries and failures).
        return result.result if result.outcome is None else f"{result.result}: {result.outcome}"

    def run_branch(task: Task, group_id: int, idx: int) -> str:
        result = runtime.get().runner.run_branch(int(group_id), int(idx), workflow=workflow)
        # In a chord, the chord body wakes the join; "chord_callback_lost" simulates a
        # body that never comes (a failed result backend), leaving it to beat's repair.
        in_chord = bool(task.request.chord) or faults.armed("chord_callback_lost")
        dispatch.publish_all(task.app, result.wakeups, in_chord=in_chord)
        return result.result

    body: Callable[..., str] = run_branch if spec.branch else run_state
    body.__name__ = body.__qualname__ = f"{wf.name}__{spec.name}"
    body.__doc__ = f"{'Branch' if spec.branch else 'State'} {spec.name!r} of {wf.name!r}."
    app.task(**options)(body)


class ReuseRedisClients(bootsteps.StartStopStep):
    """In the worker's main process, the Redis channels that ack messages and publish
    events reuse one ``redis.Redis`` client (``dispatch.reuse_redis_client``).

    kombu builds a client per ack and per event (one per task, four with task events,
    ``-E``), about a tenth of the main process's CPU per task here. The event channel
    exists whenever the worker sends any event (task events, heartbeats, gossip); with
    none it is skipped. Started after the task consumer, so again after every
    reconnection, on the new channels.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        dispatcher = getattr(c, "event_dispatcher", None)
        for channel in (
            getattr(getattr(c, "task_consumer", None), "channel", None),
            getattr(getattr(dispatcher, "producer", None), "channel", None),
        ):
            if channel is not None:
                dispatch.reuse_redis_client(channel)
