"""The SQL of retention (see ``pg_purge``).

A batch is one statement: it picks finished runs by age through ``ix_lf_runs_finished``
(``FOR UPDATE SKIP LOCKED``: a second purger, a re-drive or a signal holding a row is
passed by), deletes what hangs off them and then the runs, and returns the counts.
"""

#: Deletes the rows of the runs ``picked`` names, the runs last; counts by table.
_DELETE = """
WITH picked AS ({pick}),
x_groups AS (
    DELETE FROM lf_groups WHERE run_id IN (SELECT id FROM picked) RETURNING id
), x_branches AS (
    DELETE FROM lf_branches WHERE group_id IN (SELECT id FROM x_groups) RETURNING 1
), x_steps AS (
    DELETE FROM lf_steps WHERE run_id IN (SELECT id FROM picked) RETURNING 1
), x_signals AS (
    DELETE FROM lf_signals WHERE run_id IN (SELECT id FROM picked) RETURNING 1
), x_artifacts AS (
    DELETE FROM lf_artifacts WHERE run_id IN (SELECT id FROM picked) RETURNING 1
), x_runs AS (
    DELETE FROM lf_runs WHERE id IN (SELECT id FROM picked) RETURNING id
)
SELECT (SELECT count(*) FROM x_runs), (SELECT count(*) FROM x_steps),
       (SELECT count(*) FROM x_groups), (SELECT count(*) FROM x_branches),
       (SELECT count(*) FROM x_signals), (SELECT count(*) FROM x_artifacts),
       (SELECT coalesce(array_agg(id::text), '{{}}') FROM x_runs)
"""

#: Finished runs of ``statuses`` older than ``older_than`` seconds by the database clock,
#: oldest first.
_FINISHED = """
SELECT id FROM lf_runs
 WHERE finished_at IS NOT NULL
   AND finished_at < now() - %(older_than)s * interval '1 second'
   AND status = ANY(%(statuses)s)
 ORDER BY finished_at
 LIMIT %(limit)s"""

#: One batch: up to ``limit`` finished runs deleted with their rows.
PURGE_BATCH = _DELETE.format(pick=_FINISHED + "\n   FOR UPDATE SKIP LOCKED")

#: One run (its row locked by ``pg_control``'s ``LOCK_RUN`` already) with its rows.
PURGE_ONE = _DELETE.format(pick="SELECT id FROM lf_runs WHERE id = %(run_id)s")

#: What a batch would delete, counted; the first ``listed`` run ids.
COUNT = f"""
WITH picked AS ({_FINISHED}),
x_groups AS (SELECT id FROM lf_groups WHERE run_id IN (SELECT id FROM picked))
SELECT (SELECT count(*) FROM picked),
       (SELECT count(*) FROM lf_steps WHERE run_id IN (SELECT id FROM picked)),
       (SELECT count(*) FROM x_groups),
       (SELECT count(*) FROM lf_branches WHERE group_id IN (SELECT id FROM x_groups)),
       (SELECT count(*) FROM lf_signals WHERE run_id IN (SELECT id FROM picked)),
       (SELECT count(*) FROM lf_artifacts WHERE run_id IN (SELECT id FROM picked)),
       (SELECT coalesce(array_agg(id::text), '{{}}')
          FROM (SELECT id FROM picked LIMIT %(listed)s) listed)
"""

#: The locks the run still holds, freed and audited as forced (by ``actor``).
FREE_LOCKS_OF_RUN = """
WITH chosen AS (
    SELECT key, token, holder, holder_run FROM lf_locks
     WHERE token IS NOT NULL AND holder_run = %(run_id)s
       FOR UPDATE
), freed AS (
    UPDATE lf_locks l
       SET token = NULL, holder = NULL, holder_run = NULL, holder_state = NULL,
           expires_at = NULL, released_at = now()
      FROM chosen c
     WHERE l.key = c.key AND l.token = c.token
    RETURNING l.key, l.fence, c.token, c.holder, c.holder_run
)
INSERT INTO lf_lock_audit (key, fence, action, holder, holder_run, token, actor, reason)
SELECT key, fence, 'forced', holder, holder_run, token, %(actor)s, %(reason)s FROM freed
RETURNING key
"""
