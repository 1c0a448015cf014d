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
    keys = dispatch.redis_queue_keys(queue)
    for raw in [m for key in keys for m in reversed(r.lrange(key, 0, -1))]:
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


@pytest.mark.parametrize("sent_events", [False, True], ids=["no-events", "task-sent"])
@pytest.mark.parametrize("n", [1, 5])
def test_publish_all_uses_one_round_trip(app, redis_url, queue_name, monkeypatch, n, sent_events):
    """The messages (and their task-sent events, when on) go out in one pipeline."""
    app.conf.task_send_sent_event = sent_events  # what a worker with -E turns on
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
    # n LPUSH, and n PUBLISH (task-sent) when events are on, in one pipeline
    assert executed == [2 * n if sent_events else n]
    assert len(_queued(redis_url, queue_name)) == 1 + n


@pytest.fixture(params=[False, True], ids=["no-events", "events"])
def events_worker(request, app, settings):
    """An in-thread worker without task events (Celery's default) or with them (-E)."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(
        app,
        pool="threads",
        concurrency=2,
        perform_ping_check=False,
        queues=[settings.default_queue],
        shutdown_timeout=20,
        task_events=request.param,
    ) as worker:
        yield worker


def test_the_worker_acks_and_sends_events_through_reused_clients(
    client, app, events_worker, monkeypatch
):
    """The worker's consumer channel (acks) and, with -E, its event channel (task
    events) reuse one Redis client each, instead of building one per ack and event."""
    from tests.workflows import basic

    # Given a worker with or without task events
    events = events_worker.task_events
    consumer = events_worker.consumer
    dispatcher = consumer.event_dispatcher
    assert bool(dispatcher and dispatcher.enabled) is events
    # (with -E, the states it publishes carry task-sent events too)
    assert app.conf.task_send_sent_event is events
    channels = {"acks": consumer.task_consumer.channel}
    if events:
        channels["events"] = dispatcher.producer.channel
    for name, channel in channels.items():
        assert getattr(channel.Client, "reuses_clients", False), name
    # Warm every path with runs in flight together: the producer pool then holds the
    # connections concurrent publishes need (a new pooled connection builds its client
    # once, however many messages it later carries)
    for run_id in client.start_many(basic.linear, [{"n": 1}] * 4):
        client.wait_for(run_id, timeout=20)
    built: list[int] = []
    original = redis.Redis.__init__

    def counting(self: redis.Redis, *args: object, **kwargs: object) -> None:
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "__init__", counting)

    # When a five-state run goes through it
    done = client.wait_for(client.start(basic.linear, {"n": 2}), timeout=20)

    # Then its five acks, five publishes (with -E also their task events) built no
    # Redis client
    assert done.status == "completed", done
    assert built == [], f"{len(built)} Redis clients built for one five-state run"
