"""The one place that builds and publishes Celery messages for runs."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from datetime import datetime
from typing import Any

from celery import Celery, chord, group
from kombu.transport import redis as kombu_redis

from leaseflow import errors, faults, logs, messages
from leaseflow.fsm import registry
from leaseflow.tasks import wire


def task_name(workflow: str, state: str) -> str:
    return f"leaseflow.{workflow}.{state}"


def queue_for(workflow: str, state: str, default: str) -> str:
    """The queue of a state (its ``queue=``, from the newest version this process knows)."""
    try:
        spec = registry.get(workflow).states.get(state)
    except errors.UnknownWorkflow:
        return default
    return (spec.queue if spec is not None else None) or default


def publish(app: Celery, d: messages.Message, producer: Any = None) -> None:
    """Publish the wake-up message ``d`` as the task of its state (see ``messages``)."""
    app.send_task(
        task_name(d.workflow, d.state),
        args=d.args,
        task_id=d.task_id,
        queue=queue_for(d.workflow, d.state, app.conf.task_default_queue),
        countdown=d.countdown if d.countdown > 0 else None,
        ignore_result=True,
        producer=producer,
    )
    logs.debug("step_published", run_id=d.run_id, state=d.state, task_id=d.task_id)


PROBE_TASK = "leaseflow.queue_probe"


def publish_probe(app: Celery, queue: str, sent_at: datetime) -> None:
    """Send a probe through ``queue``; the worker that consumes it records its mark."""
    app.send_task(
        PROBE_TASK,
        args=(queue, sent_at.isoformat()),
        queue=queue,
        ignore_result=True,
    )
    logs.debug("queue_probe_published", queue=queue)


def publish_all(
    app: Celery, wakeups: Sequence[messages.Message], *, in_chord: bool = False
) -> None:
    """Publish ``wakeups``; inside a chord header task, leave the join to the chord body.

    The messages leave as one kombu publish batch (on Redis: one pipelined round trip)
    from a producer whose Redis channel reuses its client. Each is built by ``wire``,
    for about a third less CPU than ``send_task``, unless something observes
    ``send_task`` (see ``wire.usable``; e.g. a worker run with task events, ``-E``,
    which sends a ``task-sent`` event for each). If the batch fails, each message is published
    again on its own through ``send_task``, with Celery's publish retries: a message
    sent twice is harmless, every one is claimed fenced.
    """
    todo = [d for d in wakeups if not (in_chord and isinstance(d, messages.JoinWake))]
    if not todo:
        return
    try:
        with app.producer_or_acquire() as producer:
            reuse_redis_client(producer.channel)
            sender = wire.Sender(app, producer) if wire.usable(app) else None
            default = app.conf.task_default_queue
            with _batch(producer):
                for d in todo:
                    if sender is not None:
                        _publish_lean(app, sender, d, default)
                    else:
                        publish(app, d, producer)
    except Exception as exc:
        logs.warning("publish_batch_failed", error=repr(exc), messages=len(todo))
        for d in todo:
            publish(app, d)


def _publish_lean(app: Celery, sender: wire.Sender, d: messages.Message, default: str) -> None:
    """``publish`` without ``send_task``: the same message, built by ``wire``."""
    name = task_name(d.workflow, d.state)
    task = app._tasks.get(name)  # as send_task: the registry, not finalizing the app
    limits = [getattr(task, "time_limit", None), getattr(task, "soft_time_limit", None)]
    sender.publish(d, name=name, queue=queue_for(d.workflow, d.state, default), time_limits=limits)
    logs.debug("step_published", run_id=d.run_id, state=d.state, task_id=d.task_id)


def _batch(producer: Any) -> Any:
    batch = getattr(producer, "batch", None)  # kombu >= 5.7
    return batch() if batch is not None else nullcontext()


def reuse_redis_client(channel: Any) -> None:
    """Let a kombu Redis ``channel`` reuse one ``redis.Redis`` client per connection pool.

    kombu builds a new client for every publish (``Channel.conn_or_acquire``), and
    building one costs about 0.25 ms of CPU in redis-py (its response-callback table,
    redis/redis-py#3624): one per state message, two with its ``task-sent`` event. A
    client over a connection pool is made to be shared, so this channel's ``Client``
    factory hands out the same one. Other transports are left alone.
    """
    if not isinstance(channel, kombu_redis.Channel):
        return
    make = channel.Client
    if getattr(make, "reuses_clients", False):
        return
    clients: dict[int, Any] = {}

    def client(**kwargs: Any) -> Any:
        pool = kwargs.get("connection_pool")
        if pool is None or len(kwargs) != 1:
            return make(**kwargs)
        found = clients.get(id(pool))
        if found is None or found.connection_pool is not pool:
            found = clients[id(pool)] = make(**kwargs)
        return found

    client.reuses_clients = True  # type: ignore[attr-defined]
    channel.Client = client


def uses_chords(app: Celery) -> bool:
    """Chords need a result backend; without one the last branch wakes the join itself."""
    return bool(app.conf.result_backend)


def publish_fork(app: Celery, fork: messages.ForkStart) -> None:
    """Start a group's branches: a Celery chord (header = the branches, body = the join)
    when a result backend is configured, else plain messages.

    The join is exactly-once whatever happens here: the database moves the run to the
    join in the transaction of its last branch, and a join message finds nothing to
    claim unless the run is waiting at that join. The chord body is only the fast
    wake-up; beat re-publishes a join whose wake-up was lost.
    """
    if not (fork.chord and uses_chords(app)) or faults.armed("chord_disabled"):
        publish_all(app, fork.branches)
        return
    default = app.conf.task_default_queue
    header = [
        app.signature(
            task_name(d.workflow, d.state),
            args=d.args,
            task_id=d.task_id,
            queue=queue_for(d.workflow, d.state, default),
            ignore_result=False,  # the chord counts the header's results
        )
        for d in fork.branches
    ]
    join = fork.join
    body = app.signature(
        task_name(join.workflow, join.state),
        args=join.args,
        task_id=join.task_id,
        queue=queue_for(join.workflow, join.state, default),
        immutable=True,
    )
    if faults.armed("chord_callback_lost"):
        group(header).apply_async()  # a lost callback: only beat's repair wakes the join
    else:
        chord(header, body).apply_async()
    logs.debug(
        "group_published",
        run_id=join.run_id,
        group_id=fork.group_id,
        width=len(header),
        chord=True,
    )
