"""Shared fixtures: a database per test cloned from a migrated template, brokers,
an in-thread Celery worker, and real ``celery worker`` subprocesses.

A missing service skips the test on a laptop and fails it when ``CI=true``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from leaseflow import migrations
from leaseflow.settings import Settings, sqlalchemy_url

CI = os.environ.get("CI", "").lower() == "true"
ADMIN_URL = os.environ.get(
    "LEASEFLOW_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("LEASEFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("LEASEFLOW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def missing(service: str, why: object) -> None:
    """Skip on a laptop, fail in CI: CI must really exercise every service."""
    message = f"{service} is not reachable: {why}"
    if CI:
        pytest.fail(message)
    pytest.skip(message)


def _url_for(database: str) -> str:
    base, _, _ = ADMIN_URL.rpartition("/")
    return f"{base}/{database}"


def _admin() -> psycopg.Connection:
    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A database migrated to head, cloned by every test that needs Postgres."""
    try:
        conn = _admin()
    except psycopg.OperationalError as exc:
        missing("PostgreSQL", exc)
    name = f"lf_template_{os.getpid()}"
    with conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    migrations.upgrade(sqlalchemy_url(_url_for(name)))
    yield name
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class _Databases:
    """The tests' databases: each cloned from the template for one test, never reused.

    A background thread does the server's work while tests run: it creates the next
    test's database ahead of time, and drops each used one (``WITH (FORCE)``: whatever
    still connects to it is cut off) after its test. A database's name is fresh and
    never handed out twice, so nothing a test left behind can reach a later test's.
    """

    def __init__(self, template: str) -> None:
        self.template = template
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lf-test-db")
        self._next = self._thread.submit(self._create)
        self._drops: list[concurrent.futures.Future[None]] = []

    def _create(self) -> str:
        name = f"lf_test_{uuid.uuid4().hex[:12]}"
        with _admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        return name

    @staticmethod
    def _drop(name: str) -> None:
        with _admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def take(self) -> str:
        """A fresh database of the template's; the next one is started at once."""
        ready, self._next = self._next, self._thread.submit(self._create)
        return ready.result()

    def release(self, name: str) -> None:
        """Drop ``name`` soon (its test is over); :meth:`close` reports a failure."""
        self._drops.append(self._thread.submit(self._drop, name))

    def close(self) -> None:
        """Drop the database made ahead, wait for every drop; raise the first failure."""
        with contextlib.suppress(Exception):  # its failure was a test's to report
            self.release(self._next.result())
        self._thread.shutdown(wait=True)
        for dropped in self._drops:
            dropped.result()


@pytest.fixture(scope="session")
def _databases(pg_template: str) -> Iterator[_Databases]:
    databases = _Databases(pg_template)
    yield databases
    databases.close()


@pytest.fixture
def database_url(_databases: _Databases) -> Iterator[str]:
    """A fresh migrated database for this test (``CREATE DATABASE ... TEMPLATE``)."""
    name = _databases.take()
    yield sqlalchemy_url(_url_for(name))
    _databases.release(name)


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    """A plain autocommit connection to the test database, for assertions."""
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as conn:
        yield conn


def _check_redis(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as exc:
        missing("Redis", exc)


def _check_amqp(url: str) -> None:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        missing("RabbitMQ", exc)


@pytest.fixture
def redis_url() -> str:
    _check_redis(REDIS_URL)
    return REDIS_URL


@pytest.fixture
def amqp_url() -> str:
    _check_amqp(AMQP_URL)
    return AMQP_URL


@pytest.fixture
def queue_name() -> str:
    """A queue of this test's own, so tests never eat each other's messages."""
    return f"lf-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(database_url: str, redis_url: str, queue_name: str) -> Settings:
    return Settings(
        database_url=database_url,
        broker_url=redis_url,
        default_queue=queue_name,
        workflows=["tests.workflows.basic"],
        lease_ttl=2.0,
        heartbeat_interval=0.5,
        reaper_interval=0.5,
        dispatch_interval=0.5,
        dispatch_timeout=3.0,
    )


@pytest.fixture
def app(settings: Settings):
    """A Celery app bound to this test's database, broker and queue."""
    import tests.workflows.basic  # noqa: F401  (declares the shared workflows)
    from leaseflow.tasks import celery_app, runtime

    application = celery_app.make_app(settings)
    runtime.configure(settings)
    yield application
    runtime.configure(None)
    _purge(application, settings.default_queue)
    celery_app.dispose_app(application)


def _purge(application, queue: str) -> None:
    """Delete this test's queue and its bindings (kombu deletes only declared ones)."""
    import kombu

    try:
        with application.connection_for_write() as conn:
            bound = kombu.Queue(queue, kombu.Exchange(queue), routing_key=queue)(
                conn.default_channel
            )
            bound.declare()
            bound.delete()
    except Exception:  # the broker is gone: nothing left to clean
        pass


@pytest.fixture
def client(settings: Settings, app):
    from leaseflow.client import Client

    with Client(settings=settings, app=app) as c:
        yield c


@pytest.fixture
def inline_worker(app, settings: Settings):
    """A Celery worker in a thread of this process (celery.contrib.testing)."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(
        app,
        pool="threads",
        concurrency=2,
        perform_ping_check=False,
        queues=[settings.default_queue],
        shutdown_timeout=20,
    ) as worker:
        yield worker


@pytest.fixture
def store(settings: Settings):
    from leaseflow.tasks import runtime

    s = runtime.make_store(settings, application_name="leaseflow-test")
    yield s
    s.close()


def make_runner(store, settings: Settings, worker: str):
    """A Celery-free runner for one simulated worker process."""
    from leaseflow.heartbeat import LeaseKeeper
    from leaseflow.runner import Runner
    from leaseflow.tasks import runtime

    keeper = LeaseKeeper(
        store, worker=worker, ttl=settings.lease_ttl, interval=settings.heartbeat_interval
    )
    return Runner(
        store,
        keeper,
        worker=worker,
        ttl=settings.lease_ttl,
        limits=runtime.limits(settings),
        rand=lambda: 0.5,
    )


@pytest.fixture
def runner(store, settings: Settings):
    r = make_runner(store, settings, "test-worker:1")
    yield r
    r.keeper.stop()


@pytest.fixture(autouse=True)
def _root_log_level():
    """An in-thread Celery worker sets the root logger to ERROR (``start_worker``'s
    loglevel): put it back, so a later test's ``caplog`` sees warnings."""
    import logging

    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


@pytest.fixture(autouse=True)
def _disarm_faults():
    from leaseflow import faults

    yield
    faults.disarm()
