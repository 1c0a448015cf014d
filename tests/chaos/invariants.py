"""The invariants of ``/work/shared/FAULTS.md``, each one SQL query over the ledger.

An :class:`Invariant`'s query returns the *offending rows*; it holds when they equal
``expected`` (nothing, by default). Adding one is a few lines in :data:`INVARIANTS`.
Queries take named parameters:

- ``submitted``: the ids of every run the harness started (``uuid[]``);
- ``budgets``: ``workflow|state|max_attempts|inline`` strings of the chaos workflows:
  the attempt budget of each state and branch, and whether it is declared
  ``inline=True`` (``text[]``);
- ``expected``: ``run_id|error_code`` strings, the runs that must fail and how (a
  steered input, a corrupted checkpoint); every other run must complete (``text[]``);
- ``zombies``: the worker ids (``host:pid``) of the lease holders a zombie fault
  struck, each of which must have had a commit refused (``text[]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tests.chaos import workflows

TERMINAL = ("completed", "failed", "cancelled", "timed_out")
#: Outcomes of a step whose transition committed the state's effect with it (a state
#: that returns ``Wait`` records its effect in the commit of the Wait).
EFFECT_OUTCOMES = ("next", "completed", "fork", "wait")
#: Outcomes of a step that moved its run to ``next_state`` (a registered move).
MOVE_OUTCOMES = ("next", "signalled", "wait_timeout")
#: Expected ends decided outside a state (a cancel, a deadline, a wait's timeout): the
#: run's status for each such code. Every other expected code means ``failed`` by the
#: lease holder (``I1 expected failures fail closed``); these are checked by the fault
#: that expects them (``faults.py``).
UNLEASED_ENDS = {
    "E-CANCELLED": "cancelled",
    "E-RUN-TIMEOUT": "timed_out",
    "E-WAIT-TIMEOUT": "failed",
}


@dataclass(frozen=True)
class Invariant:
    """``sql`` returns the offending rows; the invariant holds when they equal ``expected``.

    ``applies`` selects the faults it is checked for (default: every fault).
    """

    name: str
    doc: str
    sql: str
    expected: Sequence[Any] = ()
    applies: Callable[[Any], bool] = lambda fault: True

    def check(self, conn: Any, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """The offending rows (empty when the invariant holds)."""
        rows = [tuple(r) for r in conn.execute(self.sql, params).fetchall()]
        return [] if rows == [tuple(r) for r in self.expected] else rows


def budgets() -> list[str]:
    """``workflow|state|max_attempts|inline`` for every state of the chaos workflows."""
    return [
        f"{wf.name}|{spec.name}|{spec.retry.max_attempts}|{spec.inline}"
        for wf in workflows.WORKFLOWS
        for spec in wf.states.values()
    ]


_BUDGET = """
budget AS (
    SELECT split_part(b, '|', 1) AS workflow, split_part(b, '|', 2) AS state,
           split_part(b, '|', 3)::int AS max_attempts, split_part(b, '|', 4)::bool AS inline
      FROM unnest(%(budgets)s::text[]) AS b
)"""

_UNLEASED_STATUS = " ".join(
    f"WHEN '{code}' THEN '{status}'" for code, status in UNLEASED_ENDS.items()
)

_EXPECTED = """
expected AS (
    SELECT split_part(e, '|', 1)::uuid AS id, split_part(e, '|', 2) AS code
      FROM unnest(%(expected)s::text[]) AS e
)"""

#: Each worker's refused commits (``leases_lost``): from the registry, or from the copy the
#: harness took of it before stopping the workers (``chaos_workers_seen``), since a
#: worker process that stops cleanly leaves the registry, its count with it.
_REFUSALS = """
refusals AS (
    SELECT id, max(leases_lost) AS leases_lost FROM (
        SELECT id, leases_lost FROM lf_workers
        UNION ALL SELECT id, leases_lost FROM chaos_workers_seen) w
     GROUP BY id
)"""

#: Each holder's stay in a lock, from the ledger: ``since`` its enter row, ``until`` the
#: first of its exit row and the audit row of the lock it held (freed under it).
_HELD = """
held AS (
    SELECT e.key, e.holder, e.fence, e.at AS since,
           least((SELECT min(x.at) FROM chaos_lock_ledger x
                   WHERE x.key = e.key AND x.holder = e.holder AND x.event = 'exit'
                     AND x.at >= e.at),
                 (SELECT min(a.at) FROM lf_lock_audit a
                   WHERE a.key = e.key AND a.fence = e.fence)) AS until
      FROM chaos_lock_ledger e WHERE e.event = 'enter'
)"""

INVARIANTS: list[Invariant] = [
    # -- I1: no run lost or stuck -----------------------------------------------------------
    Invariant(
        "I1 every submitted run exists",
        "a submitted id with no lf_runs row",
        """SELECT s.id::text FROM unnest(%(submitted)s::uuid[]) AS s(id)
            WHERE NOT EXISTS (SELECT 1 FROM lf_runs r WHERE r.id = s.id)""",
    ),
    Invariant(
        "I1 count(runs) = submitted",
        "a run nobody submitted (count(lf_runs) must equal the submitted count)",
        "SELECT id::text, workflow, status FROM lf_runs WHERE id <> ALL(%(submitted)s::uuid[])",
    ),
    Invariant(
        "I1 every run terminal",
        "a run still pending, running or waiting after quiescence",
        f"""SELECT id::text, workflow, state, status, step_seq, attempt, lease_owner
              FROM lf_runs WHERE status NOT IN {TERMINAL!r}""",
    ),
    Invariant(
        "I1 every run completed or failed as expected",
        "a run that failed (each state has attempts to spare for one fault; a fault that "
        "``exhausts`` may use them all up: every attempt of the state reaped), or one "
        "that had to fail with a given code and did not (a cancel: ``cancelled``, a run "
        "deadline: ``timed_out``, else ``failed``)",
        f"""WITH {_EXPECTED}
           SELECT r.id::text, r.workflow, r.state, r.status, r.error_code,
                  x.code AS expected, left(r.error, 200)
             FROM lf_runs r LEFT JOIN expected x ON x.id = r.id
            WHERE (x.id IS NULL AND r.status <> 'completed'
                   AND NOT (%(exhausts)s AND r.status = 'failed'
                            AND r.error_code = 'E-LEASE-EXPIRED'
                            AND (SELECT count(*) FROM lf_steps l
                                  WHERE l.run_id = r.id AND l.state = r.state
                                    AND l.outcome = 'lease_expired') >= r.max_attempts))
               OR (x.id IS NOT NULL
                   AND (r.status <> CASE x.code {_UNLEASED_STATUS} ELSE 'failed' END
                        OR r.error_code IS DISTINCT FROM x.code))""",
    ),
    Invariant(
        "I1 expected failures fail closed",
        "a run that had to fail but was not failed by its lease holder at once (its last "
        "step not a fenced 'failed', or by a branch; or a lease of it or of a branch "
        "expired: left to the reaper); not for the ends of :data:`UNLEASED_ENDS`",
        f"""WITH {_EXPECTED}
           SELECT r.id::text, r.state, s.seq, s.outcome, s.lease_token::text,
                  (SELECT count(*) FROM lf_steps l
                    WHERE l.run_id = r.id AND l.outcome = 'lease_expired') AS reaped
             FROM lf_runs r JOIN expected x ON x.id = r.id
             LEFT JOIN LATERAL (SELECT * FROM lf_steps WHERE run_id = r.id
                                 ORDER BY seq DESC LIMIT 1) s ON true
            WHERE x.code NOT IN {tuple(UNLEASED_ENDS)!r} AND (
                  s.outcome IS DISTINCT FROM 'failed' OR r.lease_token IS NOT NULL
               OR (s.lease_token IS NULL AND r.error_code <> 'E-BRANCH-FAILED')
               OR EXISTS (SELECT 1 FROM lf_steps l
                           WHERE l.run_id = r.id AND l.outcome = 'lease_expired')
               OR EXISTS (SELECT 1 FROM lf_branches b
                           WHERE b.run_id = r.id AND b.error LIKE 'E-LEASE-EXPIRED%%'))""",
    ),
    Invariant(
        "I1 no branch or group left open",
        "a branch or group still active once its run is terminal",
        """SELECT 'branch', b.group_id, b.idx, b.status FROM lf_branches b
            WHERE b.status IN ('held', 'pending', 'running')
           UNION ALL
           SELECT 'group', g.id, NULL, g.status FROM lf_groups g WHERE g.status = 'running'""",
    ),
    # -- I2: no state's effect committed twice ---------------------------------------------
    Invariant(
        "I2 one effect per (run, seq)",
        "chaos_effects holds two rows for one step of a run",
        """SELECT run_id::text, seq, count(*), array_agg(state), array_agg(token::text)
             FROM chaos_effects GROUP BY run_id, seq HAVING count(*) > 1""",
    ),
    Invariant(
        "I2 one effect per (run, state)",
        "a state's effect committed twice (every chaos workflow visits a state once)",
        """SELECT run_id::text, state, count(*), array_agg(seq), array_agg(token::text)
             FROM chaos_effects GROUP BY run_id, state HAVING count(*) > 1""",
    ),
    # -- I3: transitions legal and gap-free --------------------------------------------------
    Invariant(
        "I3 step seqs gap-free",
        "a run whose lf_steps seqs are not 1..max, or whose step_seq is not max + 1",
        """SELECT r.id::text, r.step_seq, count(s.seq), min(s.seq), max(s.seq)
             FROM lf_runs r LEFT JOIN lf_steps s ON s.run_id = r.id
            GROUP BY r.id
           HAVING count(s.seq) <> coalesce(max(s.seq), 0) OR min(s.seq) <> 1
               OR r.step_seq <> coalesce(max(s.seq), 0) + 1""",
    ),
    Invariant(
        "I3 moves registered",
        "a step's (state, next_state) that lf_transitions does not hold (a move, or a "
        "waiting run resumed by a signal or its wait's timeout)",
        f"""SELECT s.run_id::text, s.seq, s.state, s.next_state FROM lf_steps s
             JOIN lf_runs r ON r.id = s.run_id
            WHERE s.outcome IN {MOVE_OUTCOMES!r} AND NOT EXISTS (
                  SELECT 1 FROM lf_transitions t
                   WHERE t.workflow = r.workflow AND t.version = r.version
                     AND t.from_state = s.state AND t.to_state = s.next_state)""",
    ),
    Invariant(
        "I3 inline chains ran inline",
        "no step was leased in the commit of the step before it (started before that "
        "step finished): the inline continuation path never ran",
        """SELECT count(*) FROM lf_steps s
             JOIN lf_steps p ON p.run_id = s.run_id AND p.seq = s.seq - 1
            WHERE s.started_at <= p.finished_at AND s.lease_token IS NOT NULL
           HAVING count(*) = 0""",
        applies=lambda fault: getattr(fault, "standard_mix", True),  # no inline chain else
    ),
    Invariant(
        "I3 inline only where allowed",
        "a step leased in the commit of the step before it, though that step did not move "
        "(a retry, a failure) or the state is not declared inline=True",
        f"""WITH {_BUDGET}
           SELECT s.run_id::text, s.seq, p.state, p.outcome, s.state
             FROM lf_steps s
             JOIN lf_steps p ON p.run_id = s.run_id AND p.seq = s.seq - 1
             JOIN lf_runs r ON r.id = s.run_id
             LEFT JOIN budget b ON b.workflow = r.workflow AND b.state = s.state
            WHERE s.started_at <= p.finished_at AND s.lease_token IS NOT NULL
              AND (p.outcome <> 'next' OR b.inline IS DISTINCT FROM true)""",
    ),
    Invariant(
        "I3 steps chain",
        "a step whose state is not where the step before it led (or the initial state; "
        "after a fork whose group failed, the run's failure at the forking state)",
        """WITH s AS (
               SELECT s.*, lag(s.seq) OVER w AS p_seq, lag(s.state) OVER w AS p_state,
                      lag(s.outcome) OVER w AS p_outcome, lag(s.next_state) OVER w AS p_next
                 FROM lf_steps s WINDOW w AS (PARTITION BY s.run_id ORDER BY s.seq))
           SELECT s.run_id::text, s.seq, s.p_state, s.p_outcome, s.p_next, s.state
             FROM s JOIN lf_runs r ON r.id = s.run_id
             LEFT JOIN lf_groups g ON g.run_id = s.run_id AND g.parent_seq = s.p_seq
            WHERE (s.p_seq IS NULL AND NOT EXISTS (
                      SELECT 1 FROM lf_transitions t
                       WHERE t.workflow = r.workflow AND t.version = r.version
                         AND t.from_state = '' AND t.to_state = s.state))
               OR (s.p_seq IS NOT NULL AND s.state IS DISTINCT FROM CASE s.p_outcome
                      WHEN 'next' THEN s.p_next
                      WHEN 'fork' THEN CASE WHEN g.status = 'failed' AND s.outcome = 'failed'
                                            THEN s.p_state ELSE g.join_state END
                      WHEN 'retry' THEN s.p_state
                      WHEN 'lease_expired' THEN s.p_state
                      WHEN 'released' THEN s.p_state
                      WHEN 'wait' THEN s.p_state
                      WHEN 'signalled' THEN s.p_next
                      WHEN 'wait_timeout' THEN s.p_next
                   END)""",
    ),
    # -- I4: effects fenced by the committing lease ------------------------------------------
    Invariant(
        "I4 effect token = step token",
        "a committed step without its effect, an effect without its step, or tokens differ",
        f"""SELECT coalesce(s.run_id, e.run_id)::text, coalesce(s.seq, e.seq), s.state,
                  s.outcome, s.lease_token::text, e.token::text
             FROM (SELECT * FROM lf_steps WHERE outcome IN {EFFECT_OUTCOMES!r}) s
             FULL JOIN chaos_effects e ON e.run_id = s.run_id AND e.seq = s.seq
            WHERE s.lease_token IS DISTINCT FROM e.token""",
    ),
    Invariant(
        "I4 a fresh token per step",
        "two steps of a run committed (or reaped) under one lease token: a claim or an "
        "inline hand-off reused a token",
        """SELECT run_id::text, lease_token::text, array_agg(seq), array_agg(state)
             FROM lf_steps WHERE lease_token IS NOT NULL
            GROUP BY run_id, lease_token HAVING count(*) > 1""",
    ),
    Invariant(
        "I4 each zombie's commit refused",
        "a zombie fault whose struck worker (frozen, or mid-state past its lease) had no "
        "commit refused (its own lf_workers.leases_lost = 0; another worker's refusals do "
        "not count), or no zombie recorded at all",
        f"""WITH {_REFUSALS}
           SELECT z.id, coalesce(w.leases_lost, 0)
             FROM unnest(%(zombies)s::text[]) AS z(id)
             LEFT JOIN refusals w ON w.id = z.id
            WHERE coalesce(w.leases_lost, 0) = 0
           UNION ALL
           SELECT 'no zombie recorded', 0 WHERE cardinality(%(zombies)s::text[]) = 0""",
        applies=lambda fault: fault.fenced,
    ),
    # -- I5: every join exactly once, with every branch ----------------------------------------
    Invariant(
        "I5 one join per group",
        "a joined group whose join ran other than once, or one that did not join; or, "
        "for a run that must fail by a branch, a group that joined or failed other than once",
        f"""WITH {_EXPECTED}
           SELECT g.id, g.run_id::text, g.status, g.done, g.failed, g.width,
                  count(s.seq) AS joins, x.code
             FROM lf_groups g
             LEFT JOIN expected x ON x.id = g.run_id AND x.code = 'E-BRANCH-FAILED'
             LEFT JOIN lf_steps s ON s.run_id = g.run_id AND s.state = g.join_state
                  AND s.seq > g.parent_seq AND s.outcome NOT IN ('retry', 'lease_expired')
            GROUP BY g.id, x.code
           HAVING CASE WHEN x.code IS NULL
                       THEN g.status <> 'joined' OR count(s.seq) <> 1 OR g.done <> g.width
                            OR g.failed <> 0
                       ELSE g.status <> 'failed' OR count(s.seq) <> 0 OR g.failed <> 1 END""",
    ),
    Invariant(
        "I5 join saw every branch",
        "a join whose effect does not hold all W branch results, distinct and in order",
        """SELECT e.run_id::text, g.width, e.detail FROM chaos_effects e
             JOIN lf_groups g ON g.run_id = e.run_id AND e.state = g.join_state
            WHERE jsonb_array_length(e.detail -> 'results') <> g.width
               OR e.detail -> 'errors' <> '{}'::jsonb
               OR EXISTS (SELECT 1 FROM jsonb_array_elements(e.detail -> 'results')
                                  WITH ORDINALITY AS x(v, n)
                           WHERE (x.v ->> 'index')::int IS DISTINCT FROM (x.n - 1)::int)""",
    ),
    Invariant(
        "I5 one group per fan-out run",
        "a completed fan-out run with other than one joined group",
        """SELECT r.id::text, count(g.id) FROM lf_runs r
             LEFT JOIN lf_groups g ON g.run_id = r.id AND g.status = 'joined'
            WHERE r.workflow = 'chaos_fan' AND r.status = 'completed'
            GROUP BY r.id HAVING count(g.id) <> 1""",
    ),
    # -- I6: a resource lock never held by two ------------------------------------------------
    Invariant(
        "I6 never two live holders of one key",
        "two holders of one lock key inside at once, as their own enter/exit ledger rows "
        "show, unless the earlier one's lock had been freed (swept once expired, or "
        "forced: its lf_lock_audit row) before the later one entered; a holder with no "
        "exit row (killed) holds until its lock was freed",
        f"""WITH {_HELD}
           SELECT a.key, a.holder, a.fence, a.since, a.until, b.holder, b.fence, b.since
             FROM held a JOIN held b
               ON b.key = a.key AND b.holder <> a.holder AND b.since >= a.since
              AND b.since < coalesce(a.until, 'infinity'::timestamptz)
            ORDER BY a.key, a.since""",
    ),
    Invariant(
        "I6 fences grow per key",
        "a holder that entered a key with a fence not above the fence of the holder that "
        "entered it before (every acquisition of a key gets a higher fence)",
        """SELECT key, holder, fence, before_holder, before_fence FROM (
               SELECT key, holder, fence, at,
                      lag(holder) OVER w AS before_holder, lag(fence) OVER w AS before_fence
                 FROM chaos_lock_ledger WHERE event = 'enter'
               WINDOW w AS (PARTITION BY key ORDER BY at, id)) e
            WHERE fence <= before_fence""",
    ),
    Invariant(
        "I6 guarded commits in fence order",
        "a committed state that held a lock (its effect names key and fence) whose fence "
        "is not above the fence of the commit before it on that key, or whose lock had "
        "been freed by someone else (an lf_lock_audit row): a stale holder's guarded "
        "commit accepted",
        """SELECT run_id::text, key, fence, before_fence, audited FROM (
               SELECT e.run_id, e.detail ->> 'key' AS key, (e.detail ->> 'fence')::bigint AS fence,
                      lag((e.detail ->> 'fence')::bigint) OVER (
                          PARTITION BY e.detail ->> 'key' ORDER BY e.committed_at) AS before_fence,
                      EXISTS (SELECT 1 FROM lf_lock_audit a
                               WHERE a.key = e.detail ->> 'key'
                                 AND a.fence = (e.detail ->> 'fence')::bigint) AS audited
                 FROM chaos_effects e WHERE e.detail ? 'fence') c
            WHERE fence <= before_fence OR audited""",
    ),
    Invariant(
        "I6 one audit row per lock freed",
        "a lock (key, fence) freed by someone else than its holder audited twice (two "
        "sweepers, or a sweeper and a forced release, both acted)",
        """SELECT key, fence, count(*), array_agg(action) FROM lf_lock_audit
            GROUP BY key, fence HAVING count(*) > 1""",
    ),
    # -- I7: attempts within budget ---------------------------------------------------------
    Invariant(
        "I7 run attempts within budget",
        "lf_runs.attempt above max_attempts",
        "SELECT id::text, state, attempt, max_attempts FROM lf_runs WHERE attempt > max_attempts",
    ),
    Invariant(
        "I7 step attempts within the state's budget",
        "a step or branch attempt above its state's Retry.max_attempts",
        f"""WITH {_BUDGET}
           SELECT 'step', s.run_id::text, s.state, s.attempt, b.max_attempts
             FROM lf_steps s JOIN lf_runs r ON r.id = s.run_id
             JOIN budget b ON b.workflow = r.workflow AND b.state = s.state
            WHERE s.attempt > b.max_attempts
           UNION ALL
           SELECT 'branch', br.run_id::text, br.state, br.attempt, br.max_attempts
             FROM lf_branches br WHERE br.attempt > br.max_attempts""",
    ),
    Invariant(
        "I7 one reap per expiry",
        "two lease_expired rows for one (run, state, attempt)",
        """SELECT run_id::text, state, attempt, count(*) FROM lf_steps
            WHERE outcome = 'lease_expired' GROUP BY run_id, state, attempt
           HAVING count(*) > 1""",
    ),
]


def violations(conn: Any, params: dict[str, Any], fault: Any) -> dict[str, list[tuple[Any, ...]]]:
    """``{invariant name: offending rows}`` of every invariant that does not hold."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for invariant in INVARIANTS:
        if invariant.applies(fault):
            rows = invariant.check(conn, params)
            if rows:
                out[invariant.name] = rows
    return out


# -- the numbers of the summary line ----------------------------------------------------------

STATS = {
    "lost": f"""SELECT count(*) FROM unnest(%(submitted)s::uuid[]) AS s(id)
                 WHERE NOT EXISTS (SELECT 1 FROM lf_runs r
                                    WHERE r.id = s.id AND r.status IN {TERMINAL!r})""",
    "dup": """SELECT count(*) FROM (SELECT 1 FROM chaos_effects GROUP BY run_id, state
                                     HAVING count(*) > 1) d""",
    "double_joins": """SELECT count(*) FROM (
                           SELECT 1 FROM lf_groups g JOIN lf_steps s ON s.run_id = g.run_id
                                  AND s.state = g.join_state AND s.seq > g.parent_seq
                                  AND s.outcome NOT IN ('retry', 'lease_expired')
                            GROUP BY g.id HAVING count(*) > 1) d""",
    "fenced_rejections": f"""WITH {_REFUSALS}
                            SELECT coalesce(sum(leases_lost), 0)::int FROM refusals""",
}


def stats(conn: Any, params: dict[str, Any]) -> dict[str, int]:
    return {name: int(conn.execute(sql, params).fetchone()[0]) for name, sql in STATS.items()}
