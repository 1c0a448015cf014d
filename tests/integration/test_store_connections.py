"""The store's connections: a thread's own connections for claims and commits, the
pool for the rest, and what happens when one of them breaks."""

from __future__ import annotations

import threading

import psycopg

from leaseflow.store import connections
from leaseflow.tasks import runtime
from tests.integration.test_engine import drive, start
from tests.workflows import basic

CLAIMS, MAIN = connections.CLAIMS, connections.MAIN


def _backend(store, kind: str) -> int:
    [cur] = [c for (k, ident), c in store.connections.pinned().items() if k == kind]
    return cur.connection.info.backend_pid


def test_claims_and_commits_reuse_the_threads_own_connections(client, runner, store):
    # Given one run driven to the end
    assert drive(runner, start(client, basic.linear)) == ["committed"] * 5
    me = threading.get_ident()
    assert set(store.connections.pinned()) == {(CLAIMS, me), (MAIN, me)}
    backends = {kind: _backend(store, kind) for kind in (CLAIMS, MAIN)}
    # When a second run goes through the same thread
    assert drive(runner, start(client, basic.linear)) == ["committed"] * 5
    # Then its ten statements used the same two backends, not pool check-outs
    assert {kind: _backend(store, kind) for kind in (CLAIMS, MAIN)} == backends
    assert backends[CLAIMS] != backends[MAIN]
    # And close() closes them
    conns = [c.connection for c in store.connections.pinned().values()]
    store.close()
    assert all(conn.closed for conn in conns)


def test_a_terminated_commit_connection_is_replaced_and_the_commit_lands_once(
    client, runner, store, db
):
    d = start(client, basic.linear)
    [d2] = runner.run_step(d.run_id, d.step_seq).wakeups
    killed = _backend(store, MAIN)
    # Given the thread's commit connection was terminated (FAULTS: pg_terminate_backend)
    db.execute("SELECT pg_terminate_backend(%s)", (killed,))
    # When the next state runs and commits
    result = runner.run_step(d2.run_id, d2.step_seq)
    # Then the commit landed on a new connection, once
    assert result.result == "committed"
    assert _backend(store, MAIN) != killed
    assert drive(runner, result.wakeups[0]) == ["committed"] * 3
    steps = client.get(d.run_id).steps
    assert [s.seq for s in steps] == [1, 2, 3, 4, 5]


def test_threads_beyond_the_cap_take_the_pool(settings):
    store = runtime.make_store(settings.model_copy(update={"pool_max_size": 1}))
    pinned, release = threading.Event(), threading.Event()

    def holder() -> None:
        with store.connections.hot(MAIN) as cur:
            cur.execute("SELECT 1")
        pinned.set()
        release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert pinned.wait(10)
        # Given the one allowed MAIN connection belongs to another (live) thread
        # When this thread runs a statement
        with store.connections.hot(MAIN) as cur:
            pid = cur.execute("SELECT pg_backend_pid()").fetchone()[0]
        # Then it ran on a pool connection, and only the holder pinned one
        assert [key[1] for key in store.connections.pinned()] == [t.ident]
        assert pid != _backend(store, MAIN)
        with store.connections.connection(MAIN) as conn:
            assert conn.info.backend_pid == pid
    finally:
        release.set()
        t.join()
        store.close()


def test_a_nested_use_of_a_pinned_connection_takes_another_one(store):
    with store.connections.hot(MAIN) as outer:
        with store.connections.hot(MAIN) as inner:
            assert inner.connection is not outer.connection
            inner.execute("SELECT 1")
        outer.execute("SELECT 1")
    with store.connections.hot(MAIN) as again:
        assert again.connection is outer.connection  # the pinned one, back in place
        assert again.connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
