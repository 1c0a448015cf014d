"""All the SQL of the PostgreSQL store. Composite statements are built here from named
fragments; error codes and every value are parameters.

Each write that must be fenced carries ``lease_token = %(token)s AND
status = 'running'`` in its own WHERE clause: the lease check and the write are
one atomic statement, never a read followed by a write.
"""

CLAIM = """
UPDATE lf_runs
   SET status = 'running',
       lease_token = gen_random_uuid(),
       lease_owner = %(owner)s,
       lease_expires_at = now() + %(ttl)s * interval '1 second',
       claimed_at = now(),
       attempt = attempt + 1,
       updated_at = now()
 WHERE id = %(run_id)s
   AND step_seq = %(seq)s
   AND status = 'pending'
   AND not_before <= now()
RETURNING workflow, version, state, step_seq, attempt, max_attempts, lease_token::text,
          claimed_at, checkpoint, context_version, input, group_id
"""

PEEK = """
SELECT status, step_seq, workflow, state,
       greatest(0, extract(epoch FROM not_before - now()))::float8
  FROM lf_runs WHERE id = %(run_id)s
"""

#: The columns every fenced commit of a run writes, whoever holds the lease next.
_COMMIT_SET = """
       step_seq = step_seq + 1,
       max_attempts = %(max_attempts)s,
       not_before = now() + %(delay)s * interval '1 second',
       redispatch_at = now() + (%(delay)s + %(dispatch_timeout)s) * interval '1 second',
       checkpoint = coalesce(%(checkpoint)s, checkpoint),
       context_version = coalesce(%(context_version)s, context_version),
       output = %(output)s,
       error_code = %(error_code)s,
       error = %(error)s,
       finished_at = CASE WHEN %(terminal)s THEN now() END,
       updated_at = now()
"""

# -- where the run goes: the state columns of a commit --------------------------------

#: Move to another state: the transition guard trigger checks the (from, to) pair.
MOVE_TO = "state = %(next_state)s, prev_state = state, group_id = NULL,"
#: Stay in the same state (retry, completion, failure): the state column is not written.
STAY = "group_id = NULL,"
#: The fork of a run: it waits on its group.
WAIT_ON_GROUP = "group_id = %(group_id)s,"

# -- who holds the lease after the commit ----------------------------------------------

#: Nobody: the lease ends with the commit.
RELEASE_LEASE = """
       status = %(status)s, attempt = %(attempt)s,
       lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL, claimed_at = NULL,"""

#: Inline continuation: the same commit hands the lease of the next state to the
#: committing worker (a fresh token, attempt 1), so the next state needs no claim and
#: no broker hop.
HAND_OFF_LEASE = """
       status = 'running', attempt = 1, lease_token = %(next_token)s, lease_owner = %(worker)s,
       lease_expires_at = now() + %(ttl)s * interval '1 second', claimed_at = clock_timestamp(),"""

#: A lease counts only while it is unexpired by database time, whether or not the
#: reaper has reached it yet.
FENCE = """
 WHERE id = %(run_id)s AND lease_token = %(token)s AND status = 'running'
   AND lease_expires_at > now()
"""

#: The step-log row of the commit, for the run the fenced update moved.
_COMMIT_STEP = """
INSERT INTO lf_steps (run_id, seq, state, attempt, lease_token, worker, started_at,
                      finished_at, duration_ms, outcome, next_state, error)
SELECT id, step_seq - 1, %(state)s, %(step_attempt)s, %(token)s, %(worker)s, %(started_at)s,
       clock_timestamp(),
       (extract(epoch FROM clock_timestamp() - %(started_at)s) * 1000)::int,
       %(outcome)s, %(next_state)s, %(step_error)s
  FROM moved
"""

#: What the fenced update hands to the step-log insert, and what the statement returns.
MOVED = "RETURNING id, step_seq"
RETURN_SEQ = "RETURNING seq"
_MOVED_HANDED = "RETURNING id, step_seq, claimed_at"
_RETURN_STARTED = "RETURNING (SELECT claimed_at FROM moved)"


def fenced_commit(
    target: str, lease: str, *, fence: str = FENCE, moved: str = MOVED, returns: str = RETURN_SEQ
) -> str:
    """One statement: the fenced update of the run (``target`` state columns, ``lease``
    columns, the common columns, ``fence``) and its step-log row. No row back: fenced out."""
    update = "WITH moved AS (UPDATE lf_runs SET " + target + lease + _COMMIT_SET + fence + moved
    return update + ")" + _COMMIT_STEP + returns


COMMIT_MOVE = fenced_commit(MOVE_TO, RELEASE_LEASE)
COMMIT_STAY = fenced_commit(STAY, RELEASE_LEASE)
#: The next state's start time comes back (the step-log row is written as for any move).
COMMIT_HANDOFF = fenced_commit(
    MOVE_TO, HAND_OFF_LEASE, moved=_MOVED_HANDED, returns=_RETURN_STARTED
)

#: Did a commit by this token land? (the connection broke after COMMIT was sent)
COMMITTED_BY = "SELECT seq FROM lf_steps WHERE run_id = %(run_id)s AND lease_token = %(token)s"

HEARTBEAT = """
WITH seen AS (
    INSERT INTO lf_workers (id, hostname, pid) VALUES (%(worker)s, %(hostname)s, %(pid)s)
    ON CONFLICT (id) DO UPDATE SET last_seen_at = now()
), runs AS (
    UPDATE lf_runs
       SET lease_expires_at = now() + %(ttl)s * interval '1 second'
     WHERE id = ANY(%(run_ids)s::uuid[])
       AND lease_token = ANY(%(tokens)s::uuid[])
       AND status = 'running'
       AND lease_expires_at > now()
    RETURNING lease_token::text AS token
), branches AS (
    UPDATE lf_branches
       SET lease_expires_at = now() + %(ttl)s * interval '1 second'
     WHERE group_id = ANY(%(group_ids)s::bigint[])
       AND lease_token = ANY(%(branch_tokens)s::uuid[])
       AND status = 'running'
       AND lease_expires_at > now()
    RETURNING lease_token::text AS token
)
SELECT token FROM runs
UNION ALL
SELECT token FROM branches
"""

COUNT_LEASE_LOST = """
INSERT INTO lf_workers (id, hostname, pid, leases_lost)
VALUES (%(worker)s, %(hostname)s, %(pid)s, 1)
ON CONFLICT (id) DO UPDATE SET leases_lost = lf_workers.leases_lost + 1, last_seen_at = now()
"""

#: Expired leases: back to pending while attempts remain, else failed. One statement,
#: so two reapers running at once act once per expiry (the second finds the row
#: no longer 'running' once the first commits).
REAP = """
WITH expired AS (
    SELECT id, lease_token AS token, lease_owner AS owner, claimed_at AS claimed
      FROM lf_runs
     WHERE finished_at IS NULL AND status = 'running' AND lease_expires_at < now()
     ORDER BY lease_expires_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), reaped AS (
    UPDATE lf_runs r
       SET status = CASE WHEN r.attempt < r.max_attempts THEN 'pending' ELSE 'failed' END,
           error_code = CASE WHEN r.attempt < r.max_attempts THEN NULL
                             ELSE %(code)s END,
           error = CASE WHEN r.attempt < r.max_attempts THEN NULL
                        ELSE format('lease expired on attempt %%s of %%s in state %%s',
                                    r.attempt, r.max_attempts, r.state) END,
           finished_at = CASE WHEN r.attempt < r.max_attempts THEN NULL ELSE now() END,
           step_seq = r.step_seq + 1,
           lease_token = NULL,
           lease_owner = NULL,
           lease_expires_at = NULL,
           claimed_at = NULL,
           not_before = now(),
           redispatch_at = now() + %(dispatch_timeout)s * interval '1 second',
           updated_at = now()
      FROM expired e
     WHERE r.id = e.id
    RETURNING r.id, r.workflow, r.version, r.state, r.step_seq, r.status, r.attempt,
              e.token, e.owner, e.claimed
), logged AS (
    INSERT INTO lf_steps (run_id, seq, state, attempt, lease_token, worker, started_at,
                          outcome, error)
    SELECT id, step_seq - 1, state, attempt, token, owner, claimed, 'lease_expired',
           format('lease of %%s expired', coalesce(owner, 'unknown worker'))
      FROM reaped
)
SELECT id::text, workflow, version, state, step_seq, status, attempt, owner FROM reaped
"""

#: Pending runs whose message is overdue: lost between commit and publish, dropped by
#: the broker, or still waiting behind a backlog. ``published_by`` bounds the time of
#: the run's last publish (every publish sets ``redispatch_at`` to at least that time
#: plus the timeout); the dispatcher re-publishes only what a probe has shown gone.
OVERDUE = """
SELECT id::text, workflow, state,
       redispatch_at - %(dispatch_timeout)s * interval '1 second' AS published_by
  FROM lf_runs
 WHERE finished_at IS NULL AND status = 'pending' AND redispatch_at <= now()
 ORDER BY redispatch_at
 LIMIT %(limit)s
"""

#: Marks the chosen overdue runs re-published; a second dispatcher skips them.
REDISPATCH = """
WITH due AS (
    SELECT id FROM lf_runs
     WHERE id = ANY(%(ids)s::uuid[])
       AND finished_at IS NULL AND status = 'pending' AND redispatch_at <= now()
       FOR UPDATE SKIP LOCKED
)
UPDATE lf_runs r
   SET redispatch_at = now() + %(dispatch_timeout)s * interval '1 second'
  FROM due
 WHERE r.id = due.id
RETURNING r.id::text, r.workflow, r.version, r.state, r.step_seq,
          greatest(0, extract(epoch FROM r.not_before - now()))::float8
"""

#: The queues' marks: the send time of the newest probe that came through each.
QUEUE_MARKS = """
SELECT queue, passed_at FROM lf_queue_marks
 WHERE queue = ANY(%(queues)s::text[]) AND passed_at IS NOT NULL
"""

#: Starts a probe of a queue unless one is on its way (sent, not yet through, and not
#: older than the dispatch timeout, after which it is presumed lost). Two dispatchers:
#: the second finds the first's probe on its way and sends none.
SEND_PROBE = """
INSERT INTO lf_queue_marks AS m (queue, probe_sent_at) VALUES (%(queue)s, now())
ON CONFLICT (queue) DO UPDATE SET probe_sent_at = now()
 WHERE m.probe_sent_at IS NULL
    OR m.probe_sent_at <= coalesce(m.passed_at, '-infinity')
    OR m.probe_sent_at < now() - %(dispatch_timeout)s * interval '1 second'
RETURNING probe_sent_at
"""

#: A worker consumed the probe sent at ``sent_at``: everything published before it has
#: been delivered.
PROBE_PASSED = """
UPDATE lf_queue_marks
   SET passed_at = greatest(coalesce(passed_at, '-infinity'), %(sent_at)s)
 WHERE queue = %(queue)s
"""

CREATE_RUN = """
INSERT INTO lf_runs (id, workflow, version, state, status, step_seq, attempt, max_attempts,
                     checkpoint, context_version, input, idempotency_key, redispatch_at)
VALUES (%(id)s, %(workflow)s, %(version)s, %(state)s, 'pending', 1, 0, %(max_attempts)s,
        %(checkpoint)s, %(context_version)s, %(input)s, %(idempotency_key)s,
        now() + %(dispatch_timeout)s * interval '1 second')
ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id::text
"""

FIND_IDEMPOTENT = """
SELECT id::text, input FROM lf_runs WHERE workflow = %(workflow)s AND idempotency_key = %(key)s
"""

RUN_COLUMNS = """
id::text, workflow, version, state, prev_state, status, step_seq, attempt, max_attempts,
lease_owner, lease_expires_at, not_before, input, output, error_code, error, idempotency_key,
created_at, updated_at, finished_at
"""

GET_RUN = "SELECT " + RUN_COLUMNS + " FROM lf_runs WHERE id = %(run_id)s"


_NEWEST_FIRST = " ORDER BY created_at DESC, id LIMIT %(limit)s"


def list_runs(*, status: bool, workflow: bool) -> str:
    """Runs newest first, filtered on ``%(status)s`` and ``%(workflow)s`` when asked:
    the clauses are fixed text chosen here, the values always parameters."""
    clauses = [("status = %(status)s", status), ("workflow = %(workflow)s", workflow)]
    filters = " AND ".join(clause for clause, wanted in clauses if wanted)
    where = " WHERE " + filters if filters else ""
    return "SELECT " + RUN_COLUMNS + " FROM lf_runs" + where + _NEWEST_FIRST


STEPS = """
SELECT seq, state, attempt, outcome, next_state, started_at, finished_at, duration_ms, worker,
       lease_token::text, error
  FROM lf_steps WHERE run_id = %(run_id)s ORDER BY seq
"""

REGISTER_WORKFLOW = """
INSERT INTO lf_workflows (name, version, digest, definition)
VALUES (%(name)s, %(version)s, %(digest)s, %(definition)s)
ON CONFLICT (name, version) DO UPDATE
   SET digest = excluded.digest, definition = excluded.definition, registered_at = now()
 WHERE lf_workflows.digest <> excluded.digest
RETURNING (xmax = 0) AS inserted
"""

REGISTERED_DIGEST = (
    "SELECT digest FROM lf_workflows WHERE name = %(name)s AND version = %(version)s"
)

#: Two processes registering the same definition at once take turns.
LOCK_DEFINITION = "SELECT pg_advisory_xact_lock(hashtext(%(name)s), %(version)s)"

DELETE_TRANSITIONS = (
    "DELETE FROM lf_transitions WHERE workflow = %(name)s AND version = %(version)s"
)

INSERT_TRANSITION = """
INSERT INTO lf_transitions (workflow, version, from_state, to_state)
VALUES (%(name)s, %(version)s, %(from_state)s, %(to_state)s)
"""

# -- Parallel / Map groups -----------------------------------------------------------

#: A group for this step already exists: that fork committed, so this lease is spent.
CREATE_GROUP = """
INSERT INTO lf_groups (run_id, parent_seq, parent_state, join_state, join_max_attempts, kind,
                       width, on_branch_error, max_concurrency, chord, checkpoint,
                       context_version)
VALUES (%(run_id)s, %(step_seq)s, %(state)s, %(join_state)s, %(join_max_attempts)s, %(kind)s,
        %(width)s, %(on_branch_error)s, %(max_concurrency)s, %(chord)s, %(checkpoint)s,
        %(context_version)s)
ON CONFLICT (run_id, parent_seq) DO NOTHING
RETURNING id
"""

#: The fork of a run: fenced like any commit; the run waits on its group.
COMMIT_FORK = fenced_commit(WAIT_ON_GROUP, RELEASE_LEASE)

CREATE_BRANCHES = """
INSERT INTO lf_branches (group_id, idx, run_id, state, status, max_attempts, item,
                         redispatch_at)
SELECT %(group_id)s, b.idx, %(run_id)s, b.state,
       CASE WHEN %(window)s::int IS NULL OR b.idx < %(window)s THEN 'pending' ELSE 'held' END,
       b.max_attempts, b.item, now() + %(dispatch_timeout)s * interval '1 second'
  FROM unnest(%(idxs)s::int[], %(states)s::text[], %(max_attempts)s::int[], %(items)s::jsonb[])
       AS b(idx, state, max_attempts, item)
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
RETURNING b.run_id::text, r.workflow, r.version, b.state, b.attempt, b.max_attempts,
          b.lease_token::text, b.claimed_at, b.item, g.checkpoint, g.context_version,
          r.input, g.kind
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
RETURNING workflow, step_seq
"""

FAIL_PARENT = """
WITH failed AS (
    UPDATE lf_runs
       SET status = 'failed', error_code = %(code)s, error = %(error)s,
           step_seq = step_seq + 1, finished_at = now(), updated_at = now()
     WHERE id = %(run_id)s AND status = 'waiting' AND group_id = %(group_id)s
    RETURNING id, step_seq, state
)
INSERT INTO lf_steps (run_id, seq, state, attempt, started_at, outcome, error)
SELECT id, step_seq - 1, state, 1, now(), 'failed', %(error)s FROM failed
RETURNING seq
"""

BRANCH_RESULTS = """
SELECT idx, state, status, result, error FROM lf_branches
 WHERE group_id = %(group_id)s ORDER BY idx
"""

EXPIRED_BRANCHES = """
SELECT b.group_id, b.idx, b.lease_token::text, b.lease_owner, b.attempt, b.max_attempts,
       b.state, r.workflow
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
          greatest(0, extract(epoch FROM b.not_before - now()))::float8
"""

GROUPS_OF_RUN = """
SELECT g.id, g.kind, g.join_state, g.width, g.done, g.failed, g.status, g.on_branch_error,
       g.max_concurrency, g.parent_seq
  FROM lf_groups g WHERE g.run_id = %(run_id)s ORDER BY g.id
"""
