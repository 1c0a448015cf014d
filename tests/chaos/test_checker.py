"""The checker can see: each invariant flags a violation forged into a real ledger.

A clean ledger is made in-process (the runner, no Celery, no broker) by running a
few runs of every chaos workflow to completion. Each forgery is applied in a
transaction that is rolled back, and must be reported by the invariant it targets,
so a green chaos scenario means "checked and held", never "could not have seen it".
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from tests.chaos import invariants, workflows
from tests.chaos.inprocess import scratch_engine

pytestmark = pytest.mark.chaos

QUIET = {"pause": 0.0, "slow": 0.0, "p": 0.0}


@dataclass(frozen=True)
class Zombie:
    """Stands for a fault that expects fenced rejections."""

    fenced: bool = True


@pytest.fixture(scope="module")
def ledger(pg_template: str) -> Iterator[tuple[psycopg.Connection, list[str]]]:
    """A database holding 10 completed runs of the mix, and their ids."""
    with scratch_engine(pg_template) as engine:
        ids = [engine.start(workflows.MIX[i % len(workflows.MIX)], QUIET) for i in range(10)]
        engine.drive(ids)
        yield engine.conn, ids


def _params(
    ids: list[str], expected: list[str] | None = None, zombies: list[str] | None = None
) -> dict[str, object]:
    return {
        "submitted": ids,
        "budgets": invariants.budgets(),
        "expected": expected or [],
        "exhausts": False,
        "zombies": zombies if zombies is not None else [ZOMBIE],
    }


def test_a_clean_ledger_violates_nothing(ledger):
    conn, ids = ledger
    assert invariants.violations(conn, _params(ids), Zombie(fenced=False)) == {}
    assert invariants.stats(conn, _params(ids)) == {
        "lost": 0,
        "dup": 0,
        "double_joins": 0,
        "fenced_rejections": 0,
    }


def _ledger(*rows: tuple[str, int, str, int]) -> str:
    """``chaos_lock_ledger`` rows on key ``chaos:x``: ``(holder, fence, event, ms)``, at
    ``ms`` milliseconds from now."""
    values = ", ".join(
        f"('chaos:x', {fence}, 'run {holder}', '{event}', 1, now() + {ms} * interval '1 ms')"
        for holder, fence, event, ms in rows
    )
    return f"INSERT INTO chaos_lock_ledger (key, fence, holder, event, pid, at) VALUES {values}"


ONE_RUN = "(SELECT run_id FROM chaos_effects WHERE state = 'gather' LIMIT 1)"
#: The worker a zombie fault struck, in the forgeries; its commits were never refused.
ZOMBIE = "zombie-host:4242"
#: Another worker whose commit was refused (a sum over every worker would be satisfied).
BYSTANDER_REFUSED = (
    "INSERT INTO lf_workers (id, hostname, pid, leases_lost) VALUES ('bystander:7', 'b', 7, 3)"
)
FORGERIES = {
    "I1 every submitted run exists": ("SELECT 1", "extra_id"),
    "I1 count(runs) = submitted": ("SELECT 1", "drop_id"),
    "I1 every run terminal": (
        "UPDATE lf_runs SET status = 'pending', finished_at = NULL "
        "WHERE id = (SELECT id FROM lf_runs LIMIT 1)",
        None,
    ),
    "I1 every run completed or failed as expected": (
        "UPDATE lf_runs SET status = 'failed', error_code = 'E-LEASE-EXPIRED' "
        "WHERE id = (SELECT id FROM lf_runs LIMIT 1)",
        None,
    ),
    "I1 expected failures fail closed": (  # failed as expected, but by no failing step
        "UPDATE lf_runs SET status = 'failed', error_code = 'E-STATE-ERROR' WHERE id = '$FIRST'",
        "expect_first",
    ),
    "I1 no branch or group left open": (
        f"UPDATE lf_branches SET status = 'pending' WHERE run_id = {ONE_RUN} AND idx = 0",
        None,
    ),
    "I2 one effect per (run, seq)": (
        "INSERT INTO chaos_effects SELECT * FROM chaos_effects LIMIT 1",
        None,
    ),
    "I2 one effect per (run, state)": (
        "INSERT INTO chaos_effects (run_id, state, seq, token, attempt, pid) "
        "SELECT run_id, state, seq + 100, token, attempt, pid FROM chaos_effects LIMIT 1",
        None,
    ),
    "I3 step seqs gap-free": ("DELETE FROM lf_steps WHERE seq = 2 AND state = 'b'", None),
    "I3 moves registered": (
        "UPDATE lf_steps SET next_state = 'd' WHERE state = 'a' AND outcome = 'next'",
        None,
    ),
    "I3 inline chains ran inline": (
        "UPDATE lf_steps SET started_at = finished_at + interval '1 day'",
        None,
    ),
    "I3 inline only where allowed": (  # b of chaos_linear, as if handed over by a
        "UPDATE lf_steps s SET started_at = p.finished_at - interval '1 ms' "
        "FROM lf_steps p, lf_runs r WHERE p.run_id = s.run_id AND p.seq = 1 AND s.seq = 2 "
        "AND r.id = s.run_id AND r.workflow = 'chaos_linear'",
        None,
    ),
    "I3 steps chain": (
        "UPDATE lf_steps SET state = 'c' WHERE state = 'b'",
        None,
    ),
    "I4 effect token = step token": (
        "UPDATE chaos_effects SET token = gen_random_uuid() WHERE state = 'c'",
        None,
    ),
    "I4 a fresh token per step": (
        "UPDATE lf_steps s SET lease_token = p.lease_token FROM lf_steps p "
        "WHERE p.run_id = s.run_id AND p.seq = 1 AND s.seq = 2",
        None,
    ),
    "I4 each zombie's commit refused": (BYSTANDER_REFUSED, None),
    "I5 one join per group": (
        "INSERT INTO lf_steps (run_id, seq, state, attempt, outcome) "
        f"SELECT {ONE_RUN}, 100, 'gather', 2, 'next'",
        None,
    ),
    "I5 join saw every branch": (
        "UPDATE chaos_effects SET detail = jsonb_set(detail, '{results}', '[null]') "
        "WHERE state = 'gather'",
        None,
    ),
    "I5 one group per fan-out run": (
        f"UPDATE lf_groups SET status = 'failed' WHERE run_id = {ONE_RUN}",
        None,
    ),
    "I6 never two live holders of one key": (  # b enters while a is inside, a not freed
        _ledger(
            ("a", 1, "enter", 0), ("b", 2, "enter", 1), ("a", 1, "exit", 2), ("b", 2, "exit", 3)
        ),
        None,
    ),
    "I6 fences grow per key": (  # one after the other, but b's fence did not grow
        _ledger(
            ("a", 1, "enter", 0), ("a", 1, "exit", 1), ("b", 1, "enter", 2), ("b", 1, "exit", 3)
        ),
        None,
    ),
    "I6 guarded commits in fence order": (  # fence 2 committed, then fence 1
        "INSERT INTO chaos_effects (run_id, state, seq, token, attempt, pid, detail, "
        "committed_at) SELECT gen_random_uuid(), 'hold', 2, gen_random_uuid(), 1, 1, "
        "jsonb_build_object('key', 'chaos:x', 'fence', f), now() + f * interval '-1 ms' "
        "FROM generate_series(1, 2) AS f",
        None,
    ),
    "I6 one audit row per lock freed": (
        "INSERT INTO lf_lock_audit (key, fence, action, actor) "
        "VALUES ('chaos:x', 1, 'expired', 'sweeper'), ('chaos:x', 1, 'forced', 'ops')",
        None,
    ),
    "I7 run attempts within budget": (
        "UPDATE lf_runs SET attempt = max_attempts + 1 WHERE id = (SELECT id FROM lf_runs LIMIT 1)",
        None,
    ),
    "I7 step attempts within the state's budget": (
        "UPDATE lf_steps SET attempt = 6 WHERE state = 'a'",
        None,
    ),
    "I7 one reap per expiry": (
        "INSERT INTO lf_steps (run_id, seq, state, attempt, outcome) "
        "SELECT id, 100 + n, 'a', 1, 'lease_expired' "
        "FROM (SELECT id FROM lf_runs WHERE workflow = 'chaos_linear' LIMIT 1) r, "
        "generate_series(1, 2) AS n",
        None,
    ),
}


ZOMBIE_INVARIANT = "I4 each zombie's commit refused"


def test_the_zombie_invariant_holds_once_the_zombie_itself_was_refused(ledger):
    conn, ids = ledger
    with conn.transaction(force_rollback=True):
        # Given the struck worker had a commit refused (and another worker none)
        conn.execute(
            "INSERT INTO lf_workers (id, hostname, pid, leases_lost) VALUES (%s, 'z', 4242, 1),"
            " ('bystander:8', 'b', 8, 0)",
            (ZOMBIE,),
        )
        # Then the invariant holds
        found = invariants.violations(conn, _params(ids), Zombie())
        assert ZOMBIE_INVARIANT not in found, found[ZOMBIE_INVARIANT]
        # But a second zombie never refused is named
        missed = invariants.violations(conn, _params(ids, zombies=[ZOMBIE, "z2:9"]), Zombie())
        assert missed[ZOMBIE_INVARIANT] == [("z2:9", 0)]


def test_the_zombie_invariant_fails_when_no_zombie_was_recorded(ledger):
    conn, ids = ledger
    with conn.transaction(force_rollback=True):
        conn.execute(BYSTANDER_REFUSED)
        found = invariants.violations(conn, _params(ids, zombies=[]), Zombie())
    assert found[ZOMBIE_INVARIANT] == [("no zombie recorded", 0)]


def test_every_invariant_has_a_forgery():
    assert set(FORGERIES) == {i.name for i in invariants.INVARIANTS}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_each_invariant_flags_its_forgery(ledger, name):
    conn, ids = ledger
    sql, tweak = FORGERIES[name]
    submitted = list(ids)
    expected = []
    if tweak == "extra_id":
        submitted.append(str(uuid.uuid4()))
    elif tweak == "drop_id":
        submitted.pop()
    elif tweak == "expect_first":
        expected.append(f"{ids[0]}|E-STATE-ERROR")
    with conn.transaction(force_rollback=True):
        conn.execute(sql.replace("$FIRST", ids[0]))
        found = invariants.violations(conn, _params(submitted, expected), Zombie())
    assert name in found, f"{name} did not see the forgery; reported: {sorted(found)}"
