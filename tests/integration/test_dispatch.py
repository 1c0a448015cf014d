"""Publishing wake-up messages: one batch per call, a reused Redis client, a fallback."""

from __future__ import annotations

import base64
import json

import pytest
import redis
from kombu.transport import redis as kombu_redis

from leaseflow import messages
from leaseflow.tasks import dispatch


def _queued(redis_url: str, queue: str) -> list[tuple[str, str, list[object]]]:
    """``(task, id, args)`` of every message waiting in ``queue``, oldest first."""
    r = redis.Redis.from_url(redis_url)
    out = []
    for raw in reversed(r.lrange(queue, 0, -1)):
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        out.append((message["headers"]["task"], message["headers"]["id"], args))
    return out


def _dispatches(n: int) -> list[messages.Message]:
    return [messages.StateStep(f"run-{i}", "basic_linear", "a", 1 + i) for i in range(n)]


def test_publish_all_sends_every_message_once(app, redis_url, queue_name):
    dispatch.publish_all(app, _dispatches(3))
    assert _queued(redis_url, queue_name) == [
        ("leaseflow.basic_linear.a", f"run-{i}:{1 + i}", [f"run-{i}", 1 + i]) for i in range(3)
    ]


def test_a_join_is_left_to_the_chord_body(app, redis_url, queue_name):
    join = messages.JoinWake("run-j", "basic_linear", "a", 4)
    dispatch.publish_all(app, [join], in_chord=True)
    assert _queued(redis_url, queue_name) == []
    dispatch.publish_all(app, [join])
    assert [m[1] for m in _queued(redis_url, queue_name)] == ["run-j:4"]


def test_a_batch_that_fails_to_flush_is_published_message_by_message(
    app, redis_url, queue_name, monkeypatch
):
    def broken_flush(self: object) -> None:
        raise redis.ConnectionError("pipeline lost")

    monkeypatch.setattr(kombu_redis.PublishBatch, "flush", broken_flush)
    dispatch.publish_all(app, _dispatches(3))
    # The batch's buffered messages were discarded, the fallback sent each once.
    assert [m[1] for m in _queued(redis_url, queue_name)] == ["run-0:1", "run-1:2", "run-2:3"]


def test_publishing_reuses_one_redis_client_per_pool(app):
    with app.producer_or_acquire() as producer:
        channel = producer.channel
        dispatch.reuse_redis_client(channel)
        dispatch.reuse_redis_client(channel)  # idempotent: not wrapped twice
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.connection_pool is channel.pool
        other = redis.ConnectionPool()
        assert channel.Client(connection_pool=other) is not first
        assert channel.Client(connection_pool=other).connection_pool is other


def test_other_transports_are_left_alone():
    from kombu import Connection

    with Connection("memory://") as conn:
        channel = conn.channel()
        before = getattr(channel, "Client", None)
        dispatch.reuse_redis_client(channel)
        assert getattr(channel, "Client", None) is before


@pytest.mark.parametrize("n", [1, 5])
def test_publish_all_uses_one_round_trip(app, redis_url, queue_name, monkeypatch, n):
    """The messages and their task-sent events go out in one pipeline execution."""
    dispatch.publish_all(app, _dispatches(1))  # the first publish declares the queue
    executed: list[int] = []
    original = redis.client.Pipeline.execute

    def counting(self: redis.client.Pipeline, *args: object, **kwargs: object) -> object:
        executed.append(len(self.command_stack))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counting)
    single: list[object] = []
    direct = redis.Redis.execute_command  # a Pipeline queues through its own override

    def counting_direct(self: redis.Redis, *args: object, **options: object) -> object:
        single.append(args[0])
        return direct(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", counting_direct)
    dispatch.publish_all(app, _dispatches(n))
    assert single == []  # no command went out on its own
    assert executed == [2 * n]  # n LPUSH + n PUBLISH (task-sent) in one pipeline
    assert len(_queued(redis_url, queue_name)) == 1 + n


def test_the_worker_acks_and_sends_task_events_through_reused_clients(
    client, inline_worker, monkeypatch
):
    """The worker's consumer channel (acks) and event channel (task events) reuse one
    Redis client each, instead of building one per ack and per event."""
    from tests.workflows import basic

    consumer = inline_worker.consumer
    channels = {
        "acks": consumer.task_consumer.channel,
        "events": consumer.event_dispatcher.producer.channel,
    }
    for name, channel in channels.items():
        assert getattr(channel.Client, "reuses_clients", False), name

    client.wait_for(client.start(basic.linear, {"n": 1}), timeout=20)  # warm every path
    built: list[int] = []
    original = redis.Redis.__init__

    def counting(self: redis.Redis, *args: object, **kwargs: object) -> None:
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "__init__", counting)
    done = client.wait_for(client.start(basic.linear, {"n": 2}), timeout=20)
    assert done.status == "completed", done
    # Five states: five acks and fifteen task events in the worker, five publishes.
    assert built == [], f"{len(built)} Redis clients built for one five-state run"
