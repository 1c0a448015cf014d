"""The SQL of Parallel / Map groups and their branches (see ``pg_groups``).

A branch write that must be fenced carries its lease token in its own WHERE clause.
"""

#: A group for this step already exists: that fork committed, so this lease is spent.
CREATE_GROUP = """
INSERT INTO lf_groups (run_id, parent_seq, parent_state, join_state, join_max_attempts, kind,
                       width, on_branch_error, max_concurrency, chord, checkpoint,
                       context_version, tenant)
SELECT %(run_id)s, %(step_seq)s, %(state)s, %(join_state)s, %(join_max_attempts)s, %(kind)s,
       %(width)s, %(on_branch_error)s, %(max_concurrency)s, %(chord)s, %(checkpoint)s,
       %(context_version)s, tenant
  FROM lf_runs WHERE id = %(run_id)s
ON CONFLICT (run_id, parent_seq) DO NOTHING
RETURNING id
"""


CREATE_BRANCHES = """
INSERT INTO lf_branches (group_id, idx, run_id, state, status, max_attempts, item,
                         redispatch_at, tenant)
SELECT %(group_id)s, b.idx, %(run_id)s, b.state,
       CASE WHEN %(window)s::int IS NULL OR b.idx < %(window)s THEN 'pending' ELSE 'held' END,
       b.max_attempts, b.item, now() + %(dispatch_timeout)s * interval '1 second', g.tenant
  FROM unnest(%(idxs)s::int[], %(states)s::text[], %(max_attempts)s::int[], %(items)s::jsonb[])
       AS b(idx, state, max_attempts, item)
 CROSS JOIN (SELECT tenant FROM lf_groups WHERE id = %(group_id)s) g
"""

CLAIM_BRANCH = """
UPDATE lf_branches b
   SET status = 'running',
       lease_token = gen_random_uuid(),
       lease_owner = %(owner)s,
       lease_expires_at = now() + %(ttl)s * interval '1 second',
       claimed_at = now(),
       attempt = b.attempt + 1
  FROM lf_groups g, lf_runs r
 WHERE b.group_id = %(group_id)s AND b.idx = %(idx)s
   AND b.status = 'pending' AND b.not_before <= now()
   AND g.id = b.group_id AND g.status = 'running' AND r.id = g.run_id
   AND (%(versions)s::int[] IS NULL OR r.version = ANY(%(versions)s::int[]))
RETURNING b.run_id::text, r.workflow, r.version, b.state, b.attempt, b.max_attempts,
          b.lease_token::text, b.claimed_at, b.item, g.checkpoint, g.context_version,
          r.input, g.kind, r.priority
"""

PEEK_BRANCH = """
SELECT b.status, b.run_id::text, r.workflow, b.state,
       greatest(0, extract(epoch FROM b.not_before - now()))::float8
  FROM lf_branches b JOIN lf_runs r ON r.id = b.run_id
 WHERE b.group_id = %(group_id)s AND b.idx = %(idx)s
"""

_BRANCH_FENCE = """
 WHERE group_id = %(group_id)s AND idx = %(idx)s AND lease_token = %(token)s
   AND status = 'running' AND lease_expires_at > now()
"""

#: The reaper finishes a branch whose lease ran out: fenced by the expired token.
_BRANCH_FENCE_EXPIRED = """
 WHERE group_id = %(group_id)s AND idx = %(idx)s AND lease_token = %(token)s
   AND status = 'running' AND lease_expires_at <= now()
"""

_BRANCH_RETRY_SET = """
UPDATE lf_branches
   SET status = 'pending', lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL,
       claimed_at = NULL, error = %(error)s,
       not_before = now() + %(delay)s * interval '1 second',
       redispatch_at = now() + (%(delay)s + %(dispatch_timeout)s) * interval '1 second'
"""
RETRY_BRANCH = _BRANCH_RETRY_SET + _BRANCH_FENCE + " RETURNING run_id::text, state"
REQUEUE_EXPIRED_BRANCH = (
    _BRANCH_RETRY_SET + _BRANCH_FENCE_EXPIRED + " RETURNING run_id::text, state"
)

_BRANCH_FINISH_SET = """
UPDATE lf_branches
   SET status = %(status)s, result = %(result)s, error = %(error)s, lease_token = NULL,
       lease_owner = NULL, lease_expires_at = NULL, claimed_at = NULL, finished_at = now()
"""
FINISH_BRANCH = _BRANCH_FINISH_SET + _BRANCH_FENCE + " RETURNING run_id::text"
FINISH_EXPIRED_BRANCH = _BRANCH_FINISH_SET + _BRANCH_FENCE_EXPIRED + " RETURNING run_id::text"

#: Taken first by every final branch commit: all of them lock the group row before a
#: branch row, so a failing branch that cancels its siblings (fail_fast) can never
#: deadlock with a sibling committing at the same moment.
LOCK_GROUP = "SELECT 1 FROM lf_groups WHERE id = %(group_id)s FOR NO KEY UPDATE"

#: Serialises the branches of a group on its row: exactly one transaction sees the
#: count that completes it (READ COMMITTED re-reads the row after the lock wait).
COUNT_BRANCH = """
UPDATE lf_groups
   SET done = done + %(done)s, failed = failed + %(failed)s
 WHERE id = %(group_id)s AND status = 'running'
RETURNING done, failed, width, on_branch_error, join_state, max_concurrency, join_max_attempts
"""

CLOSE_GROUP = """
UPDATE lf_groups SET status = %(status)s, closed_at = now()
 WHERE id = %(group_id)s AND status = 'running'
RETURNING id
"""

CANCEL_BRANCHES = """
UPDATE lf_branches
   SET status = 'cancelled', lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL,
       finished_at = now()
 WHERE group_id = %(group_id)s AND status IN ('held', 'pending', 'running')
"""

RELEASE_HELD = """
UPDATE lf_branches
   SET status = 'pending', not_before = now(),
       redispatch_at = now() + %(dispatch_timeout)s * interval '1 second'
 WHERE group_id = %(group_id)s
   AND idx = (SELECT min(idx) FROM lf_branches WHERE group_id = %(group_id)s AND status = 'held')
RETURNING idx, state
"""

#: Only the transaction that closed the group moves the parent on to its join.
JOIN_PARENT = """
UPDATE lf_runs
   SET state = %(join_state)s, prev_state = state, status = 'pending', attempt = 0,
       max_attempts = %(max_attempts)s, not_before = now(),
       redispatch_at = now() + %(dispatch_timeout)s * interval '1 second', updated_at = now()
 WHERE id = %(run_id)s AND status = 'waiting' AND group_id = %(group_id)s
RETURNING workflow, step_seq, version, priority
"""

FAIL_PARENT = """
WITH failed AS (
    UPDATE lf_runs
       SET status = 'failed', error_code = %(code)s, error = %(error)s,
           step_seq = step_seq + 1, finished_at = now(), updated_at = now(),
           lock_key = NULL, lock_token = NULL, lock_until = NULL
     WHERE id = %(run_id)s AND status = 'waiting' AND group_id = %(group_id)s
    RETURNING id, step_seq, state, tenant
)
INSERT INTO lf_steps (run_id, seq, state, attempt, started_at, outcome, error, tenant)
SELECT id, step_seq - 1, state, 1, now(), 'failed', %(error)s, tenant FROM failed
RETURNING seq
"""

BRANCH_RESULTS = """
SELECT idx, state, status, result, error FROM lf_branches
 WHERE group_id = %(group_id)s ORDER BY idx
"""

EXPIRED_BRANCHES = """
SELECT b.group_id, b.idx, b.lease_token::text, b.lease_owner, b.attempt, b.max_attempts,
       b.state, r.workflow, r.version, r.priority
  FROM lf_branches b JOIN lf_runs r ON r.id = b.run_id
 WHERE b.finished_at IS NULL AND b.status = 'running' AND b.lease_expires_at < now()
 ORDER BY b.lease_expires_at
 LIMIT %(limit)s
"""

OVERDUE_BRANCHES = """
SELECT b.group_id, b.idx, r.workflow, b.state,
       b.redispatch_at - %(dispatch_timeout)s * interval '1 second' AS published_by
  FROM lf_branches b JOIN lf_runs r ON r.id = b.run_id
 WHERE b.finished_at IS NULL AND b.status = 'pending' AND b.redispatch_at <= now()
 ORDER BY b.redispatch_at
 LIMIT %(limit)s
"""

REDISPATCH_BRANCHES = """
WITH due AS (
    SELECT group_id, idx FROM lf_branches
     WHERE (group_id, idx) IN (SELECT * FROM unnest(%(group_ids)s::bigint[], %(idxs)s::int[]))
       AND finished_at IS NULL AND status = 'pending' AND redispatch_at <= now()
       FOR UPDATE SKIP LOCKED
)
UPDATE lf_branches b
   SET redispatch_at = now() + %(dispatch_timeout)s * interval '1 second'
  FROM due, lf_runs r
 WHERE b.group_id = due.group_id AND b.idx = due.idx AND r.id = b.run_id
RETURNING b.run_id::text, b.group_id, b.idx, r.workflow, b.state,
          greatest(0, extract(epoch FROM b.not_before - now()))::float8, r.priority, r.version
"""

GROUPS_OF_RUN = """
SELECT g.id, g.kind, g.join_state, g.width, g.done, g.failed, g.status, g.on_branch_error,
       g.max_concurrency, g.parent_seq
  FROM lf_groups g WHERE g.run_id = %(run_id)s ORDER BY g.id
"""
