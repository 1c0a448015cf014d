"""``PostgresStore``'s retention: finished runs deleted with every row that hangs off
them, in small batches, each its own short transaction (one statement, ``purge_sql``);
one run deleted at an operator's request. No transaction spans two batches, so a purge
of a million runs never holds a lock for long, and two purgers at once (two beats)
each delete a run at most once: a batch passes by the rows another one holds."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from leaseflow import errors, faults
from leaseflow.store import connections, pg_control, purge_sql
from leaseflow.store import purge_records as pr
from leaseflow.types import TERMINAL_STATUSES

#: Who a forced purge names in the audit of the locks it frees, and why.
ACTOR = "purge"
REASON = "run purged"


def _purged(row: Sequence[Any] | None, *, dry_run: bool = False) -> pr.Purged:
    assert row is not None, "a count always returns one row"
    runs, steps, groups, branches, signals, artifacts, run_ids = row
    return pr.Purged(
        int(runs),
        int(steps),
        int(groups),
        int(branches),
        int(signals),
        int(artifacts),
        tuple(run_ids),
        dry_run,
    )


def purge_batch_txn(
    conn: psycopg.Connection[Any], *, older_than: float, statuses: Sequence[str], limit: int
) -> pr.Purged:
    """One batch (one statement, so one short transaction in autocommit)."""
    params = {"older_than": older_than, "statuses": list(statuses), "limit": limit}
    done = _purged(conn.execute(purge_sql.PURGE_BATCH, params).fetchone())
    return dataclasses.replace(done, run_ids=())  # listed only by dry runs and purge_run


def count_txn(
    conn: psycopg.Connection[Any],
    *,
    older_than: float,
    statuses: Sequence[str],
    limit: int | None,
) -> pr.Purged:
    """What a purge would delete (a dry run): counted, nothing locked or deleted."""
    params = {
        "older_than": older_than,
        "statuses": list(statuses),
        "limit": limit,
        "listed": pr.LISTED,
    }
    return _purged(conn.execute(purge_sql.COUNT, params).fetchone(), dry_run=True)


def purge_run_txn(conn: psycopg.Connection[Any], run_id: str, *, force: bool) -> pr.Purged:
    """Delete one run and its rows, in the caller's transaction. An active run only with
    ``force``: its locks are freed (audited as forced), it is cancelled (a running state
    is asked to stop; its commit then finds no row: fenced off), then deleted."""
    status = pg_control.lock_run(conn, run_id)[0]
    if status not in TERMINAL_STATUSES and not force:
        raise errors.RunNotFinished(run_id, status)
    conn.execute(purge_sql.FREE_LOCKS_OF_RUN, {"run_id": run_id, "actor": ACTOR, "reason": REASON})
    if status not in TERMINAL_STATUSES:
        pg_control.cancel_txn(conn, run_id, REASON)
    return _purged(conn.execute(purge_sql.PURGE_ONE, {"run_id": run_id}).fetchone())


class Retention:
    """``purge_runs`` and ``purge_run`` of ``PostgresStore``."""

    connections: connections.Connections

    def purge_runs(
        self,
        *,
        older_than: float,
        statuses: Sequence[str] = pr.FINISHED,
        dry_run: bool = False,
        batch: int = 500,
        max_runs: int | None = None,
        pause: float = 0.0,
    ) -> pr.Purged:
        """Delete finished runs of ``statuses`` older than ``older_than`` seconds (by the
        database clock) with their rows, ``batch`` runs per transaction, ``pause``
        seconds between batches (room for live work), until a batch finds fewer or
        ``max_runs`` are gone. ``dry_run``: count them, delete nothing."""
        chosen = pr.check_statuses(statuses)
        pr.check_limits(older_than, batch, max_runs)
        if dry_run:
            return self.connections.with_retry(
                lambda c: count_txn(c, older_than=older_than, statuses=chosen, limit=max_runs)
            )

        def one_batch(conn: psycopg.Connection[Any], limit: int) -> pr.Purged:
            return purge_batch_txn(conn, older_than=older_than, statuses=chosen, limit=limit)

        total = pr.Purged()
        while (limit := pr.batch_size(batch, max_runs, total.runs)) > 0:
            # Not retried: a lost reply leaves the batch deleted, and the next one goes on.
            done = self.connections.once(functools.partial(one_batch, limit=limit))
            total = total.plus(done)
            # Chaos (F-32): the purger dies between two batches, one of them committed.
            faults.point("after_purge_batch", runs=done.runs, purged=total.runs)
            if done.runs < limit:
                break
            if pause > 0:
                time.sleep(pause)  # a throttle, not a wait for anything
        return total

    def purge_run(self, run_id: str, *, force: bool = False) -> pr.Purged:
        """Delete one run with its rows (``RunNotFound``; ``RunNotFinished`` for an active
        run unless ``force``)."""
        found = self.connections.transact(lambda c: purge_run_txn(c, run_id, force=force))
        assert found is not None
        return found
