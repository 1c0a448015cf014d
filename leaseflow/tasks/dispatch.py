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
from leaseflow.fsm.definition import StateSpec
from leaseflow.tasks import wire


def task_name(workflow: str, state: str) -> str:
    return f"leaseflow.{workflow}.{state}"


#: Seconds between a state's soft time limit (its ``timeout=``) and the hard kill.
HARD_LIMIT_GRACE = 10.0


def _spec(workflow: str, state: str, version: int | None) -> StateSpec | None:
    """The state of ``version`` (the newest this process knows when that one is unknown)."""
    try:
        wf = registry.get(workflow, version)
    except errors.UnknownWorkflow:
        try:
            wf = registry.get(workflow)
        except errors.UnknownWorkflow:
            return None
    return wf.states.get(state)


def queue_for(workflow: str, state: str, default: str, version: int | None = None) -> str:
    """The queue of a state: its ``queue=`` in the run's ``version`` (when known)."""
    return _route(_spec(workflow, state, version), default)[0]


def time_limits(workflow: str, state: str, version: int | None = None) -> list[float | None]:
    """``[hard, soft]`` time limits of a state's message: its ``timeout=`` in the run's
    version, carried by each message (a task serves every version of its state)."""
    return _route(_spec(workflow, state, version), "")[1]


def _route(spec: StateSpec | None, default: str) -> tuple[str, list[float | None]]:
    """A state's queue and its messages' ``[hard, soft]`` time limits."""
    if spec is None:
        return default, [None, None]
    limits: list[float | None] = [None, None]
    if spec.timeout is not None:
        limits = [spec.timeout + HARD_LIMIT_GRACE, spec.timeout]
    return spec.queue or default, limits


def broker_priority(app: Celery, priority: int) -> int:
    """leaseflow's priority (0 default, 9 most urgent) as the broker's: RabbitMQ reads it
    so (``x-max-priority``); kombu's Redis transport serves its lowest number first."""
    inverted = getattr(app, "leaseflow_inverted_priority", None)
    if inverted is None:  # read once per app: a configuration lookup costs microseconds
        inverted = str(app.conf.broker_url or "").startswith("redis")
        app.leaseflow_inverted_priority = inverted
    return 9 - priority if inverted else priority


def redis_queue_keys(queue: str) -> list[str]:
    """The Redis lists kombu keeps for ``queue`` (one per priority step), in the order a
    worker serves them: leaseflow's priorities 7-9 first, the default 0 last. The length
    of a queue is the sum of theirs."""
    sep = kombu_redis.Channel.sep
    return [queue if step == 0 else f"{queue}{sep}{step}" for step in kombu_redis.PRIORITY_STEPS]


def publish(app: Celery, d: messages.Message, producer: Any = None) -> None:
    """Publish the wake-up message ``d`` as the task of its state (see ``messages``)."""
    hard, soft = time_limits(d.workflow, d.state, d.version)
    app.send_task(
        task_name(d.workflow, d.state),
        args=d.args,
        task_id=d.task_id,
        queue=queue_for(d.workflow, d.state, app.conf.task_default_queue, d.version),
        countdown=d.countdown if d.countdown > 0 else None,
        ignore_result=True,
        producer=producer,
        priority=broker_priority(app, d.priority),
        time_limit=hard,
        soft_time_limit=soft,
    )
    _published(d)


PROBE_TASK = "leaseflow.queue_probe"


def publish_probe(app: Celery, queue: str, sent_at: datetime) -> None:
    """Send a probe through ``queue``; the worker that consumes it records its mark."""
    app.send_task(
        PROBE_TASK,
        args=(queue, sent_at.isoformat()),
        queue=queue,
        ignore_result=True,
        # The lowest priority: it is delivered after every message published before it.
        priority=broker_priority(app, 0),
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
    queue, limits = _route(_spec(d.workflow, d.state, d.version), default)
    sender.publish(
        d,
        name=task_name(d.workflow, d.state),
        queue=queue,
        time_limits=limits,
        priority=broker_priority(app, d.priority),
    )
    _published(d)


def _published(d: messages.Message) -> None:
    logs.debug(
        "step_published",
        run_id=d.run_id,
        state=d.state,
        task_id=d.task_id,
        step_seq=getattr(d, "step_seq", None),
        workflow=d.workflow,
    )


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

    def options(d: messages.Message) -> dict[str, Any]:
        hard, soft = time_limits(d.workflow, d.state, d.version)
        return {
            "queue": queue_for(d.workflow, d.state, default, d.version),
            "priority": broker_priority(app, d.priority),
            "time_limit": hard,
            "soft_time_limit": soft,
        }

    header = [
        app.signature(
            task_name(d.workflow, d.state),
            args=d.args,
            task_id=d.task_id,
            ignore_result=False,  # the chord counts the header's results
            **options(d),
        )
        for d in fork.branches
    ]
    join = fork.join
    body = app.signature(
        task_name(join.workflow, join.state),
        args=join.args,
        task_id=join.task_id,
        immutable=True,
        **options(join),
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
        state=join.state,
        step_seq=join.step_seq,
        workflow=join.workflow,
    )
