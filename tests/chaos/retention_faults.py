"""The fault of retention (issue 19): F-32, a purge of finished runs running beside the
mix while the purging worker is killed with ``kill -9``; and what it checks once every
run has ended. Registered in ``faults.FAULTS``.

Before any process starts (:func:`seed`), the database gets, by SQL:

- an **archive**: ``ARCHIVE_RUNS`` runs of ``chaos_archive`` finished 30 days ago
  (every status retention purges), five steps each, every tenth with a signal, an
  artefact and a joined group of two branches: all of it must go;
- **recent** finished runs (``chaos_recent``: a minute and 6 days ago, younger than the
  retention of 7 days) and **parked** ones (``chaos_parked``: created 30 days ago, still
  ``waiting``, nothing finished), each with all those rows: all of it must stay.

Beat's own schedule has no retention, so the archive waits for the fault. Once the mix
is in flight (a worker has just claimed a slow state), :func:`purge_and_kill` replaces
that worker by one armed with ``LEASEFLOW_FAULTPOINTS=after_purge_batch=kill`` whose
maintenance queue is a private one (``PURGE_QUEUE``), and starts a second beat that
sends the retention job (``LEASEFLOW_RETENTION=7d``, every second) and its other jobs
to that queue: only the armed worker purges. Its pool child deletes a first batch
(500 runs, committed) and SIGKILLs itself at the fault point; the harness then
``kill -9``s the rest of that worker, takes a row lock on a step of the oldest archived
run left (the next batch's first), and restarts the worker clean (same private queue).
Its next batch statement waits on that lock, inside the statement: the harness sees it
active in ``pg_stat_activity``, ``kill -9``s the worker again, releases the lock (the
orphaned statement goes on as PostgreSQL decides) and restarts the worker once more
(:func:`restart_purger`): the purge must go on until the archive is gone.

What the injection saw is in ``h.notes["purge"]``; :func:`purged_without_harm` checks
it, and the rows, against the counts taken before the purge began.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg

from leaseflow import errors
from leaseflow.settings import Settings
from tests.chaos.harness import Busy, Harness
from tests.helpers import eventually

ARCHIVE_WF = "chaos_archive"
RECENT_WF = "chaos_recent"
PARKED_WF = "chaos_parked"
ARCHIVE_RUNS = 3000
RECENT_RUNS = 24
PARKED_RUNS = 6
DAY_S = 86400.0
#: The retention of the purging worker's beat (``LEASEFLOW_RETENTION=7d``), and how often
#: it sends the job (``LEASEFLOW_RETENTION_INTERVAL``).
RETENTION_S = 7 * DAY_S
RETENTION_EVERY_S = 1.0
#: The fault point the first purging worker is armed with, and the line it writes.
FAULTPOINT = "after_purge_batch=kill"
FIRED = "leaseflow fault point after_purge_batch: kill"
#: The rows of a run, in the order :func:`rows_by_run` counts them.
TABLES = ("lf_runs", "lf_steps", "lf_signals", "lf_artifacts", "lf_groups", "lf_branches")
#: How long the purge may take to delete the whole archive after the last restart.
PURGED_WITHIN_S = 90.0

#: ``n`` runs of ``workflow``, statuses and ages (seconds before now they were created;
#: a finished run ended 2 s after) in rotation; five steps each, and for a share of
#: them (``extra``/256) a signal, an artefact and a joined group of two branches.
SEED = """
WITH runs AS (
    INSERT INTO lf_runs (id, workflow, version, state, prev_state, status, step_seq, attempt,
                         max_attempts, checkpoint, context_version, input, output, wait_event,
                         created_at, updated_at, finished_at, not_before, redispatch_at)
    SELECT gen_random_uuid(), %(workflow)s, 1, 's5', 's4', st, 6, 1, 1, '\\x027b7d'::bytea, 1,
           jsonb_build_object('seeded', i),
           CASE WHEN st = 'completed' THEN '{"ok": true}'::jsonb END,
           CASE WHEN st = 'waiting' THEN 'go' END,
           t, t, CASE WHEN st <> 'waiting' THEN t + interval '2 seconds' END, t, t
      FROM (SELECT i, (%(statuses)s::text[])[1 + i %% cardinality(%(statuses)s::text[])] AS st,
                   now() + i * interval '10 ms' - interval '1 second'
                       * (%(ages)s::float8[])[1 + (i / cardinality(%(statuses)s::text[]))
                                                  %% cardinality(%(ages)s::float8[])] AS t
              FROM generate_series(1, %(n)s) i) g
    RETURNING id, created_at, status
), steps AS (
    INSERT INTO lf_steps (run_id, seq, state, attempt, lease_token, worker, started_at,
                          finished_at, duration_ms, outcome, next_state)
    SELECT id, s, 's' || s, 1, gen_random_uuid(), 'celery@archive:4242', created_at,
           created_at + s * interval '100 ms', 3,
           CASE WHEN s = 5 THEN 'completed' ELSE 'next' END,
           CASE WHEN s = 5 THEN NULL ELSE 's' || (s + 1) END
      FROM runs CROSS JOIN generate_series(1, 5) s
    RETURNING 1
), extra AS (
    SELECT id, created_at, status FROM runs WHERE get_byte(uuid_send(id), 15) < %(extra)s
), signals AS (
    INSERT INTO lf_signals (run_id, signal_id, event, payload, received_at, consumed_at,
                            consumed_seq)
    SELECT id, 'approve', 'go', '{"approve": true}'::jsonb, created_at,
           CASE WHEN status <> 'waiting' THEN created_at + interval '1 second' END,
           CASE WHEN status <> 'waiting' THEN 3 END
      FROM extra
    RETURNING 1
), artifacts AS (
    INSERT INTO lf_artifacts (run_id, name, content_type, codec, data, size_bytes,
                              stored_bytes, sha256, state, step_seq, created_at)
    SELECT id, 'report.txt', 'text/plain', 2, '\\x0268656c6c6f'::bytea, 5, 6,
           repeat('0', 64), 's3', 3, created_at
      FROM extra
    RETURNING 1
), groups AS (
    INSERT INTO lf_groups (run_id, parent_seq, parent_state, join_state, join_max_attempts,
                           kind, width, done, failed, on_branch_error, checkpoint,
                           context_version, status, created_at, closed_at)
    SELECT id, 2, 's2', 's3', 1, 'parallel', 2, 2, 0, 'fail', '\\x027b7d'::bytea, 1,
           'joined', created_at, created_at + interval '1 second'
      FROM extra
    RETURNING id, run_id
)
INSERT INTO lf_branches (group_id, idx, run_id, state, status, attempt, max_attempts,
                         result, finished_at)
SELECT g.id, b, g.run_id, 'b', 'completed', 1, 1, '{}'::jsonb, now()
  FROM groups g CROSS JOIN generate_series(0, 1) b
"""

FINISHED = ["completed", "failed", "cancelled", "timed_out"]
#: What :func:`seed` inserts: (workflow, runs, statuses, ages in seconds, share/256 with
#: a signal, an artefact and a group).
SEEDS = (
    (ARCHIVE_WF, ARCHIVE_RUNS, FINISHED, [30 * DAY_S], 26),
    (RECENT_WF, RECENT_RUNS, FINISHED, [60.0, 6 * DAY_S], 256),
    (PARKED_WF, PARKED_RUNS, ["waiting"], [30 * DAY_S], 256),
)

#: Rows of each table whose owner is gone: a run for the first four, a group for
#: branches (and a branch whose run is gone, too).
ORPHANS = """
SELECT 'lf_steps', count(*) FROM lf_steps x
 WHERE NOT EXISTS (SELECT 1 FROM lf_runs r WHERE r.id = x.run_id)
UNION ALL
SELECT 'lf_signals', count(*) FROM lf_signals x
 WHERE NOT EXISTS (SELECT 1 FROM lf_runs r WHERE r.id = x.run_id)
UNION ALL
SELECT 'lf_artifacts', count(*) FROM lf_artifacts x
 WHERE NOT EXISTS (SELECT 1 FROM lf_runs r WHERE r.id = x.run_id)
UNION ALL
SELECT 'lf_groups', count(*) FROM lf_groups x
 WHERE NOT EXISTS (SELECT 1 FROM lf_runs r WHERE r.id = x.run_id)
UNION ALL
SELECT 'lf_branches', count(*) FROM lf_branches x
 WHERE NOT EXISTS (SELECT 1 FROM lf_groups g WHERE g.id = x.group_id)
    OR NOT EXISTS (SELECT 1 FROM lf_runs r WHERE r.id = x.run_id)
"""

#: A purge batch (``purge_sql.PURGE_BATCH``) running now, from a worker's pool child.
ACTIVE_PURGE = """
SELECT pid, application_name, clock_timestamp() - query_start, wait_event_type
  FROM pg_stat_activity
 WHERE datname = current_database() AND state = 'active'
   AND application_name LIKE 'leaseflow-worker %%'
   AND query LIKE '%%DELETE FROM lf_groups%%' AND query LIKE '%%SKIP LOCKED%%'
"""


#: The backends of the given ``application_name``s.
BACKENDS_OF = "SELECT pid FROM pg_stat_activity WHERE application_name = ANY(%s)"


def db(h: Harness) -> psycopg.Connection[Any]:
    assert h.db is not None, "the harness is open"
    return h.db


def rows(h: Harness, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in db(h).execute(sql, params).fetchall()]


def seed_rows(conn: psycopg.Connection[Any]) -> None:
    """The archive, the recent finished runs and the parked ones (see the module)."""
    for workflow, n, statuses, ages, extra in SEEDS:
        conn.execute(  # a run's first state must be a registered entry (lf_check_transition)
            "INSERT INTO lf_transitions (workflow, version, from_state, to_state) "
            "VALUES (%s, 1, '', 's5') ON CONFLICT DO NOTHING",
            (workflow,),
        )
        conn.execute(
            SEED,
            {"workflow": workflow, "n": n, "statuses": statuses, "ages": ages, "extra": extra},
        )


def run_ids(h: Harness, workflow: str) -> list[str]:
    return [r[0] for r in rows(h, "SELECT id::text FROM lf_runs WHERE workflow = %s", (workflow,))]


def rows_by_run(h: Harness, ids: list[str]) -> dict[str, tuple[int, ...]]:
    """Per run id: its ``lf_runs`` row (0 or 1) and its rows in each table of
    :data:`TABLES` (branches by their ``run_id``)."""
    found = rows(
        h,
        """SELECT x.id::text,
                  (SELECT count(*) FROM lf_runs r WHERE r.id = x.id),
                  (SELECT count(*) FROM lf_steps s WHERE s.run_id = x.id),
                  (SELECT count(*) FROM lf_signals s WHERE s.run_id = x.id),
                  (SELECT count(*) FROM lf_artifacts a WHERE a.run_id = x.id),
                  (SELECT count(*) FROM lf_groups g WHERE g.run_id = x.id),
                  (SELECT count(*) FROM lf_branches b WHERE b.run_id = x.id)
             FROM unnest(%s::uuid[]) AS x(id)""",
        (ids,),
    )
    return {run_id: tuple(int(n) for n in counts) for run_id, *counts in found}


def archive_left(h: Harness) -> int:
    return int(rows(h, "SELECT count(*) FROM lf_runs WHERE workflow = %s", (ARCHIVE_WF,))[0][0])


def seed(h: Harness) -> None:
    """Before any process starts: the archive, the recent and the parked runs, counted."""
    seed_rows(db(h))
    db(h).execute("ANALYZE")
    kept = run_ids(h, RECENT_WF) + run_ids(h, PARKED_WF)
    h.notes["purge"] = {"kept": rows_by_run(h, kept), "archive": archive_left(h)}


def purge_settings(h: Harness) -> Settings:
    """The purging worker's and its beat's: retention on, their own maintenance queue."""
    return h.settings.model_copy(
        update={
            "beat_queue": f"{h.settings.default_queue}.purge",
            "retention": RETENTION_S,
            "retention_interval": RETENTION_EVERY_S,
        }
    )


def fired(h: Harness) -> bool:
    return any(FIRED in proc.log() for proc in h.started)


def purge_and_kill(h: Harness, busy: Busy) -> str | None:
    """The first round only (later rounds of the long profile let the purge run on):
    count the live runs' rows; arm the struck worker's slot with the fault point on a
    private maintenance queue, start the retention beat sending there; once the fault
    point fired (a batch committed, the pool child gone), ``kill -9`` the rest of that
    worker, block the next batch (:func:`block_next_batch`) and restart it clean; then
    ``kill -9`` it again inside that batch's statement (:func:`kill_inside_statement`),
    and leave the restart to :func:`restart_purger`."""
    if h.round:
        return None
    note: dict[str, Any] = h.notes["purge"]
    note["live"] = rows_by_run(h, list(h.submitted))
    settings = purge_settings(h)
    slot = busy.slot
    armed = h.restart_worker(slot, faultpoints=FAULTPOINT, settings=settings).worker_ids()
    h.start_beat(settings)
    with contextlib.suppress(AssertionError):  # the check reports a point that never fired
        eventually(lambda: fired(h), timeout=60, interval=0.02, message="after_purge_batch fired")
    note["fired"] = fired(h)
    note["left_at_fire"] = archive_left(h)
    killed = sorted({*armed, *h.workers[slot].worker_ids()})
    h.workers[slot].kill()
    with contextlib.suppress(AssertionError):  # a batch left running would take the lock
        eventually(
            lambda: not rows(h, BACKENDS_OF, (["leaseflow-worker " + w for w in killed],)),
            timeout=30,
            message="the killed purger's backends gone",
        )
    blocker = block_next_batch(h)
    h.restart_worker(slot, settings=settings)
    note["inside"] = kill_inside_statement(h, slot, blocker)
    return slot


def block_next_batch(h: Harness) -> psycopg.Connection[Any]:
    """Hold a row lock on a step of the oldest archived run left (the next batch picks
    it first), in a transaction of the harness's own: that batch's statement waits
    inside, at its ``DELETE FROM lf_steps``, until :func:`kill_inside_statement`."""
    conn = h.connect("chaos-purge-blocker", autocommit=False)
    locked = conn.execute(
        """SELECT 1 FROM lf_steps WHERE run_id = (
               SELECT id FROM lf_runs WHERE workflow = %s AND finished_at IS NOT NULL
                ORDER BY finished_at LIMIT 1)
           ORDER BY seq LIMIT 1 FOR UPDATE""",
        (ARCHIVE_WF,),
    ).fetchall()
    if not locked:
        h.problems.append("F-32: no archived run left to hold the next purge batch on")
    return conn


def kill_inside_statement(
    h: Harness, slot: str, blocker: psycopg.Connection[Any]
) -> dict[str, Any] | None:
    """Once a pool child of ``slot`` runs a purge batch (``pg_stat_activity``: active,
    held by ``blocker``'s lock), ``kill -9`` that worker; then let the statement go on
    (the blocker rolls back) and note what became of it: the archive left before the
    kill and once its backend has ended. None if no batch was seen."""
    worker = h.workers[slot]

    def purging() -> tuple[Any, ...] | None:
        mine = set(worker.worker_ids())
        found = [r for r in rows(h, ACTIVE_PURGE) if r[1].split(" ", 1)[-1] in mine]
        return found[0] if found else None

    try:
        try:
            backend, app, running, wait = eventually(
                purging, timeout=60, interval=0.02, message="a purge batch under way"
            )
        except AssertionError:
            return None
        left = archive_left(h)
        worker.kill()
    finally:
        blocker.rollback()
        blocker.close()
    with contextlib.suppress(AssertionError):  # its end is noted either way
        eventually(
            lambda: not rows(h, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,)),
            timeout=30,
            message=f"backend {backend} of the killed purge gone",
        )
    return {
        "backend": backend,
        "worker": app,
        "active_s": round(running.total_seconds(), 2),
        "waiting_on": wait,
        "left_before": left,
        "left_after": archive_left(h),
    }


def restart_purger(h: Harness, slot: str | None) -> None:
    """A clean purging worker in the killed one's place: the purge goes on."""
    if slot is not None:
        h.restart_worker(slot, settings=purge_settings(h))


def purged_without_harm(h: Harness) -> list[str]:
    """F-32: once the archive is gone (polled, with a deadline), :func:`verdict`; then the
    recent and parked runs are deleted (``purge_run``), so the invariants see only the
    mix."""
    note: dict[str, Any] = h.notes.get("purge", {})
    with contextlib.suppress(AssertionError):  # the verdict names what is left
        eventually(
            lambda: archive_left(h) == 0,
            timeout=PURGED_WITHIN_S,
            interval=0.25,
            message="the archive purged",
        )
    problems = verdict(h)
    print(
        f"F-32 purge: fault point fired with {note.get('left_at_fire')} of "
        f"{note.get('archive')} archived runs left; inside a statement: {note.get('inside')}"
    )
    assert h.client is not None, "the harness is open"
    for run_id in note.get("kept", {}):  # the invariants know the submitted runs only
        with contextlib.suppress(errors.RunNotFound):  # a kept run lost: reported above
            h.client.store.purge_run(run_id, force=True)
    return problems


def verdict(h: Harness) -> list[str]:
    """The batch loop was killed after a committed batch (the fault point fired, part
    of the archive gone) and a purge statement was cut off by ``kill -9``
    (:func:`struck`); the archive is entirely gone; no row of a live run (the mix,
    counted before the purge), a recent or a parked run was deleted; no orphan row."""
    note: dict[str, Any] = h.notes.get("purge", {})
    if "live" not in note:
        return ["F-32 never started the purge"]
    return (
        struck(note)
        + archive_gone(h)
        + untouched(h, note["live"], "live", grew=True)
        + untouched(h, note["kept"], "kept", grew=False)
        + orphans(h)
    )


def struck(note: dict[str, Any]) -> list[str]:
    """The evidence of the kills: the fault point fired after a committed batch (some of
    the archive gone, not all), and a purge statement was active when the worker was
    killed."""
    problems = []
    total, left = note.get("archive"), note.get("left_at_fire")
    if not note.get("fired"):
        problems.append(f"F-32: the fault point never fired ({FIRED!r} in no log)")
    elif total is None or left is None or not 0 < left < total:
        problems.append(
            f"F-32: the fault point fired with {left} of {total} archived runs left: "
            "not after a committed batch of a purge still under way"
        )
    inside = note.get("inside")
    if not inside:
        problems.append("F-32: no purge statement was seen active to kill its worker in")
    elif not inside["left_before"] > 0:
        problems.append(f"F-32: the worker killed in a purge of nothing: {inside}")
    return problems


def archive_gone(h: Harness) -> list[str]:
    left = rows_by_run(h, run_ids(h, ARCHIVE_WF))
    if not left:
        return []
    return [f"F-32: {len(left)} archived runs never purged, e.g. {next(iter(left.items()))}"]


def untouched(
    h: Harness, before: dict[str, tuple[int, ...]], what: str, *, grew: bool
) -> list[str]:
    """Every run of ``before`` still there with all its rows (``grew``: a live run may
    have gained rows since; else exactly the same)."""
    after = rows_by_run(h, list(before))
    problems = []
    for run_id, counts in before.items():
        now = after.get(run_id, (0,) * len(TABLES))
        lost = [
            f"{table} {b} -> {a}"
            for table, b, a in zip(TABLES, counts, now, strict=True)
            if a < b or (not grew and a != b)
        ]
        if lost:
            problems.append(f"F-32: {what} run {run_id} lost rows: {', '.join(lost)}")
    return problems


def orphans(h: Harness) -> list[str]:
    return [f"F-32: {n} orphan rows in {table}" for table, n in rows(h, ORPHANS) if n]
