"""The one place that builds and publishes Celery messages for runs."""

from __future__ import annotations

from celery import Celery

from leaseflow import errors, logs
from leaseflow.fsm import registry
from leaseflow.runner import Dispatch


def task_name(workflow: str, state: str) -> str:
    return f"leaseflow.{workflow}.{state}"


def queue_for(workflow: str, state: str, default: str) -> str:
    """The queue of a state (its ``queue=``, from the newest version this process knows)."""
    try:
        spec = registry.get(workflow).states.get(state)
    except errors.UnknownWorkflow:
        return default
    return (spec.queue if spec is not None else None) or default


def publish(app: Celery, d: Dispatch) -> None:
    """Publish the wake-up message ``(run_id, step_seq)`` for ``d.state``.

    The task id is ``<run_id>:<step_seq>``, so Flower shows one task per step and
    a re-published message is recognisably the same step.
    """
    app.send_task(
        task_name(d.workflow, d.state),
        args=(d.run_id, d.step_seq),
        task_id=f"{d.run_id}:{d.step_seq}",
        queue=queue_for(d.workflow, d.state, app.conf.task_default_queue),
        countdown=d.countdown if d.countdown > 0 else None,
        ignore_result=True,
    )
    logs.event("step_published", 10, run_id=d.run_id, state=d.state, step_seq=d.step_seq)


def publish_all(app: Celery, dispatches: tuple[Dispatch, ...] | list[Dispatch]) -> None:
    for d in dispatches:
        publish(app, d)
