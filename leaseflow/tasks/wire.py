"""Celery task messages for wake-ups, built here (protocol 2) instead of by ``send_task``.

``app.send_task`` merges task options, routes, builds and publishes a message for
about 0.75 ms of CPU on the 2-core benchmark machine, about as much as the rest of a
no-op state. Every wake-up leaseflow sends is alike (a registered state task, two
positional arguments, no result, an explicit queue), so :class:`Sender` builds the
same message from a few values read once per batch and hands it to kombu's
``Producer.publish`` (about 0.3 ms; a whole one-message batch, 0.55-0.75 ms against
0.85-1.0 ms). A worker cannot tell the two apart: same headers, body, properties and
queue declaration.

:func:`usable` says when ``send_task`` must be used instead, because something
watches or changes what it sends: task-sent events (``task_send_sent_event``),
receivers of ``before_task_publish``/``after_task_publish`` (tracing and error
reporting libraries hook those), another task protocol.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery, signals
from celery.utils.nodenames import anon_nodename

from leaseflow import messages

#: The body's third part (callbacks, errbacks, chain, chord): always empty here.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_origin: tuple[int, str] = (0, "")


def usable(app: Celery) -> bool:
    """May wake-ups bypass ``send_task`` on ``app``? Not when anything observes it."""
    conf = app.conf
    return not (
        conf.task_send_sent_event
        or conf.task_protocol != 2
        or signals.before_task_publish.receivers
        or signals.after_task_publish.receivers
    )


def origin() -> str:
    """``gen<pid>@<host>``, as ``send_task`` names the sender (after a fork too)."""
    global _origin
    pid = os.getpid()
    if _origin[0] != pid:
        _origin = (pid, anon_nodename())
    return _origin[1]


def headers(
    app: Celery, d: messages.Message, name: str, time_limits: list[float | None]
) -> dict[str, Any]:
    """The protocol-2 headers ``send_task`` would write for ``d``."""
    task_id = d.task_id
    parent = app.current_worker_task  # inside a task, as send_task: its id and root
    parent_id = parent.request.id if parent is not None else None
    root_id = (parent.request.root_id or parent_id) if parent is not None else task_id
    eta = None
    if d.countdown > 0:
        eta = (datetime.now(UTC) + timedelta(seconds=d.countdown)).isoformat()
    return {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": None,
        "eta": eta,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": time_limits,
        "root_id": root_id,
        "parent_id": parent_id,
        "argsrepr": repr(d.args),
        "kwargsrepr": "{}",
        "origin": origin(),
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }


class Sender:
    """Publishes wake-ups through one kombu ``producer`` of ``app``; the app's settings
    are read once, when it is made (one per batch)."""

    def __init__(self, app: Celery, producer: Any) -> None:
        conf = app.conf
        self.app = app
        self.producer = producer
        self.compression = conf.task_compression
        self.delivery_mode = conf.task_default_delivery_mode
        #: Queues declared on this channel (a new channel after a reconnection
        #: declares again), so kombu's per-publish declaration check is skipped.
        channel = producer.channel
        declared: set[str] | None = getattr(channel, "leaseflow_declared", None)
        if declared is None:
            declared = set()
            channel.leaseflow_declared = declared
        self.declared = declared

    def publish(
        self,
        d: messages.Message,
        *,
        name: str,
        queue: str,
        time_limits: list[float | None],
        priority: int | None = None,
    ) -> None:
        """Publish ``d`` as task ``name`` on ``queue`` (no retry: the caller falls back to
        ``send_task``, which retries, when this raises)."""
        head = headers(self.app, d, name, time_limits)
        entity = self.app.amqp.queues[queue]  # created if missing, as send_task does
        declare = None
        if queue not in self.declared:
            declare = [entity]
        self.producer.publish(
            (list(d.args), {}, _EMBED),
            exchange="",
            routing_key=queue,
            serializer="json",
            compression=self.compression,
            retry=False,
            delivery_mode=entity.exchange.delivery_mode or self.delivery_mode,
            declare=declare,
            headers=head,
            correlation_id=head["id"],
            reply_to=self.app.thread_oid,  # as send_task
            priority=priority,
        )
        if declare is not None:
            self.declared.add(queue)
