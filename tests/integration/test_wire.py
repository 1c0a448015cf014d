"""Wake-ups built by ``tasks.wire`` (``dispatch.publish_all``): the very message
``send_task`` (``dispatch.publish``) sends, unless something observes ``send_task``."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import kombu
import pytest
import redis
from celery import signals

from leaseflow import messages
from leaseflow.tasks import dispatch, wire
from tests.conftest import _purge
from tests.helpers import eventually


def _pop(redis_url: str, queue: str) -> dict[str, Any]:
    """The oldest raw message of ``queue`` (kombu pushes on the left)."""
    client = redis.Redis.from_url(redis_url)
    raw = None
    for key in dispatch.redis_queue_keys(queue):  # one list per priority step
        raw = raw or client.rpop(key)
    assert raw is not None, f"no message in {queue}"
    return json.loads(raw)


def _eta(message: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(message["headers"].pop("eta"))


@pytest.mark.parametrize(
    "d",
    [
        messages.StateStep("run-1", "linear5", "s2", 2),
        messages.BranchStep("run-2", "linear5", "s3", group_id=7, idx=3),
        messages.StateStep("run-3", "timed", "bounded", 1, countdown=30.0),  # time limits
    ],
    ids=["state", "branch", "countdown-time-limits"],
)
def test_the_lean_message_is_the_one_send_task_sends(app, redis_url, queue_name, d):
    assert wire.usable(app)
    # When the same wake-up is published by wire, then by send_task
    dispatch.publish_all(app, [d])
    dispatch.publish(app, d)
    lean, sent = _pop(redis_url, queue_name), _pop(redis_url, queue_name)
    # Then they are the same message but for the delivery tag (and the eta, by a hair)
    assert lean["properties"].pop("delivery_tag") != sent["properties"].pop("delivery_tag")
    if d.countdown:
        assert abs((_eta(lean) - _eta(sent)).total_seconds()) < 1
        assert lean["headers"]["timelimit"] == [11.0, 1.0]
    assert lean == sent
    assert lean["headers"]["id"] == d.task_id
    assert lean["headers"]["root_id"] == d.task_id
    assert lean["headers"]["parent_id"] is None


def test_inside_a_task_its_id_and_root_are_parent_and_root(app, redis_url, queue_name):
    from celery.contrib.testing.worker import start_worker

    wakeups = [messages.StateStep(f"run-{i}", "linear5", "s2", 2) for i in range(2)]
    ran: list[str] = []

    @app.task(name="lf-test.publisher", bind=True, shared=False, ignore_result=True)
    def publisher(task: Any) -> None:
        dispatch.publish_all(app, wakeups[:1])  # wire
        dispatch.publish(app, wakeups[1])  # send_task
        ran.append(task.request.id)

    # Given a worker consuming another queue than the wake-ups'
    other = f"{queue_name}-publisher"
    try:
        with start_worker(
            app, pool="threads", concurrency=1, perform_ping_check=False, queues=[other]
        ):
            # When a task of a workflow started elsewhere (its root) publishes
            publisher.apply_async(queue=other, task_id="pub-1", root_id="root-1")
            eventually(lambda: ran, timeout=20, message="the publisher ran")
    finally:
        _purge(app, other)
    lean, sent = _pop(redis_url, queue_name), _pop(redis_url, queue_name)
    # Then both messages name the task as their parent, and its root as theirs
    for message in (lean, sent):
        assert message["headers"]["parent_id"] == "pub-1"
        assert message["headers"]["root_id"] == "root-1"
    assert lean["headers"]["origin"] == sent["headers"]["origin"]


@pytest.mark.parametrize(
    "conf", [{"task_send_sent_event": True}, {"task_protocol": 1}], ids=["sent-event", "v1"]
)
def test_settings_that_change_the_message_go_through_send_task(app, monkeypatch, conf):
    sent: list[str] = []
    send_task = app.send_task

    def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(name)
        return send_task(name, *args, **kwargs)

    monkeypatch.setattr(app, "send_task", spy)
    app.conf.update(conf)
    assert not wire.usable(app)
    dispatch.publish_all(app, [messages.StateStep("run-1", "linear5", "s2", 2)])
    assert sent == ["leaseflow.linear5.s2"]


@pytest.fixture(params=["before_task_publish", "after_task_publish"])
def publish_receiver(request):
    """A receiver of a publish signal, as tracing libraries connect: the ids it saw."""
    signal = getattr(signals, request.param)
    seen: list[str] = []

    def receiver(sender: object = None, headers: Any = None, **kwargs: object) -> None:
        seen.append(headers["id"])

    signal.connect(receiver, weak=False)
    yield seen
    signal.disconnect(receiver)


def test_a_publish_signal_receiver_sees_every_message(app, redis_url, queue_name, publish_receiver):
    wakeups = [messages.StateStep(f"run-{i}", "linear5", "s2", 2) for i in range(3)]
    # Given a receiver of a publish signal
    assert not wire.usable(app)
    # When wake-ups are published
    dispatch.publish_all(app, wakeups)
    # Then it was called once for each (send_task), and each was sent once
    assert publish_receiver == [d.task_id for d in wakeups]
    assert [_pop(redis_url, queue_name)["headers"]["id"] for _ in wakeups] == publish_receiver


def test_a_queue_is_declared_once_per_channel(app, queue_name, monkeypatch):
    declared: list[str] = []
    maybe_declare = kombu.Producer.maybe_declare

    def spy(self: kombu.Producer, entity: Any, *args: Any, **kwargs: Any) -> Any:
        declared.append(entity.name)
        return maybe_declare(self, entity, *args, **kwargs)

    monkeypatch.setattr(kombu.Producer, "maybe_declare", spy)
    # When two batches go out through the app's producer
    dispatch.publish_all(app, [messages.StateStep("run-1", "linear5", "s2", 2)])
    dispatch.publish_all(app, [messages.StateStep("run-2", "linear5", "s2", 2)])
    # Then the queue was declared by the first only, and its channel remembers it
    assert declared == [queue_name]
    with app.producer_or_acquire() as producer:  # (kombu's pools outlive an app)
        assert queue_name in producer.channel.leaseflow_declared
    # And a producer on a new channel (after a reconnection) declares it again
    with app.connection_for_write() as conn:
        sender = wire.Sender(app, app.amqp.Producer(conn.default_channel))
        d = messages.StateStep("run-3", "linear5", "s2", 2)
        sender.publish(d, name="leaseflow.linear5.s2", queue=queue_name, time_limits=[None, None])
    assert declared == [queue_name, queue_name]
