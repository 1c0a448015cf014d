"""The checks of F-32 (a purge under ``kill -9``, ``retention_faults.py``) can see: the
verdict holds on a real ledger of what the fault should leave, and flags forged rows or
notes that break each of its properties.

The ledger is made in-process on a scratch database: the seed of the scenario (archive,
recent and parked runs), runs of the chaos mix driven to completion (the live runs,
counted as the injection counts them), then the engine's own purge
(``store.purge_runs``, the retention job's call) stopped by the fault point
``after_purge_batch`` once its first batch committed (an in-process hook raising, where
the scenario's worker SIGKILLs itself), and run again to the end as the restarted
worker does. The notes are what the injection would have noted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import psycopg
import pytest

from leaseflow import faults
from tests.chaos import retention_faults as rf
from tests.chaos import workflows
from tests.chaos.harness import Harness
from tests.chaos.inprocess import scratch_engine

pytestmark = pytest.mark.chaos

QUIET = {"pause": 0.0, "slow": 0.0, "p": 0.0}


@dataclass
class Noted:
    """Stands for the harness in a check: its database connection and its notes."""

    db: psycopg.Connection[Any]
    notes: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Ledger:
    conn: psycopg.Connection[Any]
    note: dict[str, Any]
    live: list[str]


def noted(ledger: Ledger, **changes: Any) -> Harness:
    return cast(Harness, Noted(ledger.conn, {"purge": {**ledger.note, **changes}}))


@pytest.fixture(scope="module")
def ledger(pg_template: str) -> Iterator[Ledger]:
    with scratch_engine(pg_template) as engine:
        h = cast(Harness, Noted(engine.conn))
        # Given the seed, and a mix of live runs with steps, groups and branches
        rf.seed(h)
        live = [engine.start(workflows.MIX[i % len(workflows.MIX)], QUIET) for i in range(10)]
        engine.drive(live)
        note = h.notes["purge"]
        note["live"] = rf.rows_by_run(h, live)

        # When the purge dies after its first batch, and a later one runs to the end
        def die(info: dict[str, object]) -> None:
            raise faults.FaultInjected("after_purge_batch")

        faults.arm("after_purge_batch", die)
        try:
            with pytest.raises(faults.FaultInjected):
                engine.store.purge_runs(older_than=rf.RETENTION_S)
        finally:
            faults.disarm("after_purge_batch")
        note["fired"] = True
        note["left_at_fire"] = rf.archive_left(h)
        assert note["left_at_fire"] == rf.ARCHIVE_RUNS - 500
        note["inside"] = {"backend": 1, "left_before": note["left_at_fire"], "left_after": 0}
        engine.store.purge_runs(older_than=rf.RETENTION_S)
        yield Ledger(engine.conn, note, live)


def forged(ledger: Ledger, sql: str, params: Any = None) -> Iterator[None]:
    """Run ``sql`` in a transaction rolled back after the check."""
    with ledger.conn.transaction(force_rollback=True):
        ledger.conn.execute(sql, params)
        yield


def verdict_with(ledger: Ledger, sql: str, params: Any = None) -> list[str]:
    for _ in forged(ledger, sql, params):
        problems = rf.verdict(noted(ledger))
    return problems


def test_the_verdict_holds_on_the_ledger(ledger: Ledger) -> None:
    assert rf.verdict(noted(ledger)) == []


def test_the_verdict_flags_a_purge_never_started(ledger: Ledger) -> None:
    h = cast(Harness, Noted(ledger.conn, {"purge": {"kept": {}, "archive": 3000}}))
    assert rf.verdict(h) == ["F-32 never started the purge"]


def test_the_verdict_flags_a_fault_point_that_never_fired(ledger: Ledger) -> None:
    problems = rf.verdict(noted(ledger, fired=False))
    assert any("the fault point never fired" in p for p in problems), problems


@pytest.mark.parametrize("left", [0, rf.ARCHIVE_RUNS])
def test_the_verdict_flags_a_kill_outside_a_purge_under_way(ledger: Ledger, left: int) -> None:
    problems = rf.verdict(noted(ledger, left_at_fire=left))
    assert any(f"fired with {left} of {rf.ARCHIVE_RUNS}" in p for p in problems), problems


def test_the_verdict_flags_no_kill_inside_a_statement(ledger: Ledger) -> None:
    problems = rf.verdict(noted(ledger, inside=None))
    assert any("no purge statement was seen active" in p for p in problems), problems
    problems = rf.verdict(noted(ledger, inside={"left_before": 0}))
    assert any("killed in a purge of nothing" in p for p in problems), problems


def test_the_verdict_flags_an_archived_run_left(ledger: Ledger) -> None:
    params = {"workflow": rf.ARCHIVE_WF, "n": 1, "statuses": ["failed"], "ages": [rf.DAY_S * 30]}
    problems = verdict_with(ledger, rf.SEED, {**params, "extra": 256})
    assert any("1 archived runs never purged" in p for p in problems), problems


def test_the_verdict_flags_a_live_run_s_rows_deleted(ledger: Ledger) -> None:
    for table, column in [("lf_steps", "run_id"), ("lf_groups", "run_id"), ("lf_runs", "id")]:
        sql = f"DELETE FROM {table} WHERE {column} = ANY(%s::uuid[])"
        problems = verdict_with(ledger, sql, (ledger.live,))
        assert any(p.startswith("F-32: live run") and f"{table} " in p for p in problems), problems


@pytest.mark.parametrize("workflow", [rf.RECENT_WF, rf.PARKED_WF])
@pytest.mark.parametrize(
    ("table", "lost"),
    [
        ("lf_runs", "1 -> 0"),
        ("lf_signals", "1 -> 0"),
        ("lf_artifacts", "1 -> 0"),
        ("lf_branches", "2 -> 0"),
    ],
)
def test_the_verdict_flags_a_kept_run_s_rows_deleted(
    ledger: Ledger, workflow: str, table: str, lost: str
) -> None:
    column = "id" if table == "lf_runs" else "run_id"
    sql = (
        f"DELETE FROM {table} WHERE {column} = "
        "(SELECT id FROM lf_runs WHERE workflow = %s ORDER BY id LIMIT 1)"
    )
    problems = verdict_with(ledger, sql, (workflow,))
    assert any(p.startswith("F-32: kept run") and f"{table} {lost}" in p for p in problems), (
        problems
    )


def test_the_verdict_flags_a_kept_run_that_gained_rows(ledger: Ledger) -> None:
    sql = (
        "INSERT INTO lf_steps (run_id, seq, state, attempt, outcome) "
        "SELECT id, 99, 's5', 1, 'completed' FROM lf_runs WHERE workflow = %s LIMIT 1"
    )
    problems = verdict_with(ledger, sql, (rf.RECENT_WF,))
    assert any("lf_steps 5 -> 6" in p for p in problems), problems


@pytest.mark.parametrize(
    ("table", "sql"),
    [
        (
            "lf_steps",
            "INSERT INTO lf_steps (run_id, seq, state, attempt, outcome, tenant) "
            "VALUES (gen_random_uuid(), 1, 's1', 1, 'next', 'default')",
        ),
        (
            "lf_signals",
            "INSERT INTO lf_signals (run_id, signal_id, event, tenant) "
            "VALUES (gen_random_uuid(), 'x', 'go', 'default')",
        ),
        ("lf_artifacts", "DELETE FROM lf_runs WHERE workflow = 'chaos_parked'"),
        ("lf_groups", "DELETE FROM lf_runs WHERE id = ANY(%(live)s::uuid[])"),
        ("lf_branches", "DELETE FROM lf_groups WHERE run_id = ANY(%(live)s::uuid[])"),
    ],
)
def test_the_verdict_flags_orphan_rows(ledger: Ledger, table: str, sql: str) -> None:
    problems = verdict_with(ledger, sql, {"live": ledger.live})
    assert any(f"orphan rows in {table}" in p for p in problems), problems
