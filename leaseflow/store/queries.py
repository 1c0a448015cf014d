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
   AND (run_deadline IS NULL OR run_deadline > now())
   AND (%(versions)s::int[] IS NULL OR version = ANY(%(versions)s::int[]))
RETURNING workflow, version, state, step_seq, attempt, max_attempts, lease_token::text,
          claimed_at, checkpoint, context_version, input, group_id, priority, signal,
          lock_key, lock_token::text, lock_until, not_before
"""

PEEK = """
SELECT status, step_seq, workflow, state,
       greatest(0, extract(epoch FROM not_before - now()))::float8, version, priority,
       coalesce(run_deadline <= now(), false)
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
MOVE_TO = "state = %(next_state)s, prev_state = state, group_id = NULL, signal = NULL,"
#: Stay in the same state (retry, completion, failure): the state column is not written.
STAY = "group_id = NULL,"
#: The fork of a run: it waits on its group.
WAIT_ON_GROUP = "group_id = %(group_id)s,"
#: A Wait: the run stays in its state, parked on what ``wait`` names.
WAIT_FOR = """group_id = NULL, signal = NULL, wait = %(wait)s, wait_event = %(wait_event)s,
       wait_deadline = now() + %(wait_timeout)s * interval '1 second',"""

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
#: reaper has reached it yet, and the run was neither asked to cancel nor is past its
#: deadline (then ``control_sql.END_LEASED`` ends it instead).
FENCE = """
 WHERE id = %(run_id)s AND lease_token = %(token)s AND status = 'running'
   AND lease_expires_at > now() AND NOT cancel_requested
   AND (run_deadline IS NULL OR run_deadline > now())
"""

#: The step-log row of the commit, for the run the fenced update moved.
_COMMIT_STEP = """
INSERT INTO lf_steps (run_id, seq, state, attempt, lease_token, worker, started_at,
                      finished_at, duration_ms, outcome, next_state, error, context_bytes,
                      checkpoint_bytes, tenant)
SELECT id, step_seq - 1, %(state)s, %(step_attempt)s, %(token)s, %(worker)s, %(started_at)s,
       clock_timestamp(),
       (extract(epoch FROM clock_timestamp() - %(started_at)s) * 1000)::int,
       %(outcome)s, %(next_state)s, %(step_error)s, %(context_bytes)s, %(checkpoint_bytes)s,
       tenant
  FROM moved
"""

#: What the fenced update hands to the step-log insert, and what the statement returns.
MOVED = "RETURNING id, step_seq, tenant"
RETURN_SEQ = "RETURNING seq"
_MOVED_HANDED = "RETURNING id, step_seq, claimed_at, tenant"
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
COMMIT_WAIT = fenced_commit(WAIT_FOR, RELEASE_LEASE)
#: The next state's start time comes back (the step-log row is written as for any move).
COMMIT_HANDOFF = fenced_commit(
    MOVE_TO, HAND_OFF_LEASE, moved=_MOVED_HANDED, returns=_RETURN_STARTED
)

#: Did a commit by this token land? (the connection broke after COMMIT was sent)
COMMITTED_BY = "SELECT seq FROM lf_steps WHERE run_id = %(run_id)s AND lease_token = %(token)s"

HEARTBEAT = """
WITH seen AS (
    INSERT INTO lf_workers (id, hostname, pid, queues, concurrency, leases_held)
    VALUES (%(worker)s, %(hostname)s, %(pid)s, %(queues)s, %(concurrency)s,
            cardinality(%(run_ids)s::uuid[]) + cardinality(%(group_ids)s::bigint[]))
    ON CONFLICT (id) DO UPDATE
       SET last_seen_at = now(), status = 'alive', leases_held = excluded.leases_held,
           queues = coalesce(excluded.queues, lf_workers.queues),
           concurrency = coalesce(excluded.concurrency, lf_workers.concurrency)
), runs AS (
    UPDATE lf_runs
       SET lease_expires_at = now() + %(ttl)s * interval '1 second'
     WHERE id = ANY(%(run_ids)s::uuid[])
       AND lease_token = ANY(%(tokens)s::uuid[])
       AND status = 'running'
       AND lease_expires_at > now()
    RETURNING lease_token::text AS token, cancel_requested AS cancel
), branches AS (
    UPDATE lf_branches
       SET lease_expires_at = now() + %(ttl)s * interval '1 second'
     WHERE group_id = ANY(%(group_ids)s::bigint[])
       AND lease_token = ANY(%(branch_tokens)s::uuid[])
       AND status = 'running'
       AND lease_expires_at > now()
    RETURNING lease_token::text AS token
), locks AS (
    UPDATE lf_locks l
       SET expires_at = now() + %(ttl)s * interval '1 second'
      FROM lf_runs r
     WHERE r.id = ANY(%(run_ids)s::uuid[]) AND r.lease_token = ANY(%(tokens)s::uuid[])
       AND r.status = 'running' AND l.key = r.lock_key AND l.token = r.lock_token
)
SELECT token, cancel, true FROM runs
UNION ALL
SELECT token, false, true FROM branches
UNION ALL
SELECT lease_token::text, true, false FROM lf_branches
 WHERE group_id = ANY(%(group_ids)s::bigint[])
   AND lease_token = ANY(%(branch_tokens)s::uuid[])
   AND status = 'cancelled'
"""

#: Workers that stopped checking in are dead (the one asking excepted); a second beat
#: finds them dead already.
MARK_DEAD = """
UPDATE lf_workers SET status = 'dead'
 WHERE id IN (SELECT id FROM lf_workers
               WHERE status = 'alive' AND id <> %(self)s
                 AND last_seen_at < now() - %(after)s * interval '1 second'
                 FOR UPDATE SKIP LOCKED)
RETURNING id, hostname, pid, last_seen_at
"""

#: The leases of dead workers expire now: the reaper hands them on at once.
EXPIRE_LEASES_OF = """
WITH runs AS (
    UPDATE lf_runs SET lease_expires_at = now() - interval '1 millisecond'
     WHERE lease_owner = ANY(%(owners)s) AND status = 'running' AND lease_expires_at > now()
    RETURNING id
), branches AS (
    UPDATE lf_branches SET lease_expires_at = now() - interval '1 millisecond'
     WHERE lease_owner = ANY(%(owners)s) AND status = 'running' AND lease_expires_at > now()
    RETURNING group_id
)
SELECT (SELECT count(*) FROM runs) + (SELECT count(*) FROM branches)
"""

#: A worker shutting down hands back the runs it will not finish: pending again at once,
#: the attempt refunded, a ``released`` step logged.
RELEASE_RUNS_OF = """
WITH owned AS (
    SELECT id, lease_token AS token, lease_owner AS owner, claimed_at AS claimed,
           lock_key, lock_token
      FROM lf_runs
     WHERE lease_owner = ANY(%(owners)s) AND status = 'running'
       FOR UPDATE
), freed AS (
    UPDATE lf_locks l
       SET token = NULL, holder = NULL, holder_run = NULL, holder_state = NULL,
           expires_at = NULL, released_at = now()
      FROM owned o
     WHERE l.key = o.lock_key AND l.token = o.lock_token
), released AS (
    UPDATE lf_runs r
       SET status = 'pending', attempt = greatest(r.attempt - 1, 0), step_seq = r.step_seq + 1,
           lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL, claimed_at = NULL,
           not_before = now(),
           redispatch_at = now() + %(dispatch_timeout)s * interval '1 second',
           lock_key = NULL, lock_token = NULL, lock_until = NULL, updated_at = now()
      FROM owned o
     WHERE r.id = o.id
    RETURNING r.id, r.workflow, r.version, r.state, r.step_seq, r.priority, r.attempt,
              o.token, o.owner, o.claimed, r.tenant
), logged AS (
    INSERT INTO lf_steps (run_id, seq, state, attempt, lease_token, worker, started_at,
                          outcome, error, tenant)
    SELECT id, step_seq - 1, state, attempt + 1, token, owner, claimed, 'released',
           'the worker shut down before the state finished: handed back, attempt refunded',
           tenant
      FROM released
)
SELECT id::text, workflow, version, state, step_seq, 0.0::float8, priority FROM released
"""

RELEASE_BRANCHES_OF = """
UPDATE lf_branches b
   SET status = 'pending', attempt = greatest(b.attempt - 1, 0), lease_token = NULL,
       lease_owner = NULL, lease_expires_at = NULL, claimed_at = NULL, not_before = now(),
       redispatch_at = now() + %(dispatch_timeout)s * interval '1 second'
  FROM lf_runs r
 WHERE b.lease_owner = ANY(%(owners)s) AND b.status = 'running' AND r.id = b.run_id
RETURNING b.run_id::text, b.group_id, b.idx, r.workflow, b.state, 0.0::float8, r.priority,
          r.version
"""

#: A worker that stops cleanly leaves the registry.
FORGET_WORKERS = "DELETE FROM lf_workers WHERE id = ANY(%(ids)s)"

LIST_WORKERS = """
SELECT id, hostname, pid, queues, concurrency, started_at, last_seen_at, leases_held,
       leases_lost, status
  FROM lf_workers ORDER BY status, hostname, pid LIMIT %(limit)s
"""

COUNT_LEASE_LOST = """
INSERT INTO lf_workers (id, hostname, pid, leases_lost)
VALUES (%(worker)s, %(hostname)s, %(pid)s, 1)
ON CONFLICT (id) DO UPDATE SET leases_lost = lf_workers.leases_lost + 1, last_seen_at = now()
"""

#: Expired leases: back to pending while attempts remain, else failed. One statement,
#: so two reapers running at once act once per expiry (the second finds the row
#: no longer 'running' once the first commits). The lock a reaped attempt held is freed
#: (audited): the next attempt takes it again under a higher fence, so a resource
#: refuses the stuck attempt if it wakes up.
REAP = """
WITH expired AS (
    SELECT id, lease_token AS token, lease_owner AS owner, claimed_at AS claimed,
           lock_key, lock_token
      FROM lf_runs
     WHERE finished_at IS NULL AND status = 'running' AND lease_expires_at < now()
     ORDER BY lease_expires_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), held AS (
    SELECT l.key, l.fence, l.token, l.holder, l.holder_run
      FROM lf_locks l JOIN expired e ON l.key = e.lock_key AND l.token = e.lock_token
       FOR UPDATE OF l
), freed AS (
    UPDATE lf_locks l
       SET token = NULL, holder = NULL, holder_run = NULL, holder_state = NULL,
           expires_at = NULL, released_at = now()
      FROM held h
     WHERE l.key = h.key AND l.token = h.token
), audited AS (
    INSERT INTO lf_lock_audit (key, fence, action, holder, holder_run, token, actor, reason)
    SELECT key, fence, 'expired', holder, holder_run, token, 'reaper',
           'the holder''s lease expired'
      FROM held
), reaped AS (
    UPDATE lf_runs r
       SET status = CASE WHEN r.cancel_requested THEN 'cancelled'
                         WHEN r.attempt < r.max_attempts THEN 'pending' ELSE 'failed' END,
           error_code = CASE WHEN r.cancel_requested THEN %(cancelled)s
                             WHEN r.attempt < r.max_attempts THEN NULL ELSE %(code)s END,
           error = CASE WHEN r.cancel_requested
                        THEN coalesce('cancelled: ' || r.cancel_reason, 'cancelled')
                        WHEN r.attempt < r.max_attempts THEN NULL
                        ELSE format('lease expired on attempt %%s of %%s in state %%s',
                                    r.attempt, r.max_attempts, r.state) END,
           finished_at = CASE WHEN r.attempt < r.max_attempts AND NOT r.cancel_requested
                              THEN NULL ELSE now() END,
           step_seq = r.step_seq + 1,
           lease_token = NULL,
           lease_owner = NULL,
           lease_expires_at = NULL,
           claimed_at = NULL,
           not_before = now(),
           redispatch_at = now() + %(dispatch_timeout)s * interval '1 second',
           lock_key = NULL, lock_token = NULL, lock_until = NULL,
           updated_at = now()
      FROM expired e
     WHERE r.id = e.id
    RETURNING r.id, r.workflow, r.version, r.state, r.step_seq, r.status, r.attempt,
              e.token, e.owner, e.claimed, r.priority, r.tenant
), logged AS (
    INSERT INTO lf_steps (run_id, seq, state, attempt, lease_token, worker, started_at,
                          outcome, error, tenant)
    SELECT id, step_seq - 1, state, attempt, token, owner, claimed, 'lease_expired',
           format('lease of %%s expired', coalesce(owner, 'unknown worker')), tenant
      FROM reaped
)
SELECT id::text, workflow, version, state, step_seq, status, attempt, owner, priority
  FROM reaped
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
          greatest(0, extract(epoch FROM r.not_before - now()))::float8, r.priority
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
                     checkpoint, context_version, input, idempotency_key, redispatch_at,
                     priority, run_deadline, tenant)
VALUES (%(id)s, %(workflow)s, %(version)s, %(state)s, 'pending', 1, 0, %(max_attempts)s,
        %(checkpoint)s, %(context_version)s, %(input)s, %(idempotency_key)s,
        now() + %(dispatch_timeout)s * interval '1 second', %(priority)s,
        now() + %(run_timeout)s * interval '1 second', %(tenant)s)
ON CONFLICT (tenant, workflow, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id::text
"""

FIND_IDEMPOTENT = """
SELECT id::text, input FROM lf_runs
 WHERE tenant = %(tenant)s AND workflow = %(workflow)s AND idempotency_key = %(key)s
"""

RUN_COLUMNS = """
id::text, workflow, version, state, prev_state, status, step_seq, attempt, max_attempts,
lease_owner, lease_expires_at, not_before, input, output, error_code, error, idempotency_key,
created_at, updated_at, finished_at, priority, wait_event, wait_deadline, run_deadline,
cancel_requested, tenant
"""

GET_RUN = "SELECT " + RUN_COLUMNS + " FROM lf_runs WHERE id = %(run_id)s"


_NEWEST_FIRST = " ORDER BY created_at DESC, id DESC LIMIT %(limit)s"


def list_runs(*, status: bool, workflow: bool, tenant: bool = False, before: bool = False) -> str:
    """Runs newest first, filtered on ``%(status)s``, ``%(workflow)s``, ``%(tenant)s`` and
    after the page ending at ``(%(before_at)s, %(before_id)s)`` (keyset) when asked: the
    clauses are fixed text chosen here, the values always parameters."""
    clauses = [
        ("status = %(status)s", status),
        ("workflow = %(workflow)s", workflow),
        ("tenant = %(tenant)s", tenant),
        ("(created_at, id) < (%(before_at)s, %(before_id)s::uuid)", before),
    ]
    filters = " AND ".join(clause for clause, wanted in clauses if wanted)
    where = " WHERE " + filters if filters else ""
    return "SELECT " + RUN_COLUMNS + " FROM lf_runs" + where + _NEWEST_FIRST


STEPS = """
SELECT seq, state, attempt, outcome, next_state, started_at, finished_at, duration_ms, worker,
       lease_token::text, error, context_bytes, checkpoint_bytes
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

#: The fork of a run: fenced like any commit; the run waits on its group.
COMMIT_FORK = fenced_commit(WAIT_ON_GROUP, RELEASE_LEASE)
