"""The SQL of waits, signals, cancels, re-drives and deadlines (see ``pg_control``).

Every operation that changes a run from outside its lease (a signal, a cancel, a
re-drive, the timeout sweeper) first locks the run's row (``LOCK_RUN``, or ``FOR
UPDATE SKIP LOCKED`` in the sweeper), so a signal racing a timeout or a cancel, or a
signal racing the commit of the Wait it answers, has one winner.
"""

LOCK_RUN = """
SELECT status, state, step_seq, wait, coalesce(wait_deadline > now(), true), workflow,
       version, priority
  FROM lf_runs WHERE id = %(run_id)s
   FOR UPDATE
"""

INSERT_SIGNAL = """
INSERT INTO lf_signals (run_id, signal_id, event, payload, tenant)
SELECT %(run_id)s, %(signal_id)s, %(event)s, %(payload)s, tenant
  FROM lf_runs WHERE id = %(run_id)s
ON CONFLICT (run_id, signal_id) DO NOTHING
RETURNING id
"""

MARK_SIGNAL = "UPDATE lf_signals SET consumed_at = now(), consumed_seq = %(seq)s WHERE id = %(id)s"

#: The oldest stored signal for the event a Wait asks for, consumed.
TAKE_SIGNAL = """
UPDATE lf_signals SET consumed_at = now(), consumed_seq = %(seq)s
 WHERE id = (SELECT id FROM lf_signals
              WHERE run_id = %(run_id)s AND event = %(event)s AND consumed_at IS NULL
              ORDER BY id LIMIT 1 FOR UPDATE)
RETURNING payload
"""

#: A waiting run resumes at ``state`` (a signal, or a timeout with somewhere to go).
RESUME = """
WITH resumed AS (
    UPDATE lf_runs
       SET state = %(state)s, prev_state = state, status = 'pending', attempt = 0,
           max_attempts = %(max_attempts)s, step_seq = step_seq + 1, signal = %(signal)s,
           wait = NULL, wait_event = NULL, wait_deadline = NULL, not_before = now(),
           redispatch_at = now() + %(dispatch_timeout)s * interval '1 second',
           updated_at = now()
     WHERE id = %(run_id)s AND status = 'waiting' AND step_seq = %(seq)s
    RETURNING id, step_seq, prev_state, tenant
)
INSERT INTO lf_steps (run_id, seq, state, attempt, started_at, finished_at, outcome,
                      next_state, error, tenant)
SELECT id, step_seq - 1, prev_state, 0, clock_timestamp(), clock_timestamp(), %(outcome)s,
       %(state)s, %(note)s, tenant
  FROM resumed
RETURNING seq + 1
"""

#: An unleased run ends (cancelled, failed at a wait's timeout, or past its deadline).
END_RUN = """
WITH ended AS (
    UPDATE lf_runs
       SET status = %(status)s, error_code = %(code)s, error = %(error)s,
           step_seq = step_seq + 1, lease_token = NULL, lease_owner = NULL,
           lease_expires_at = NULL, claimed_at = NULL, wait = NULL, wait_event = NULL,
           wait_deadline = NULL, cancel_reason = coalesce(%(reason)s, cancel_reason),
           lock_key = NULL, lock_token = NULL, lock_until = NULL,
           finished_at = now(), updated_at = now()
     WHERE id = %(run_id)s AND finished_at IS NULL
    RETURNING id, step_seq, state, attempt, tenant
)
INSERT INTO lf_steps (run_id, seq, state, attempt, started_at, finished_at, outcome, error,
                      tenant)
SELECT id, step_seq - 1, state, attempt, now(), clock_timestamp(), %(outcome)s, %(error)s,
       tenant
  FROM ended
RETURNING seq + 1
"""

#: The open groups of an ended run close, and their branches stop. A cancelled branch
#: keeps its token so that its worker's heartbeat learns it was cancelled.
CANCEL_GROUPS = """
WITH closed AS (
    UPDATE lf_groups SET status = 'cancelled', closed_at = now()
     WHERE run_id = %(run_id)s AND status = 'running'
    RETURNING id
)
UPDATE lf_branches
   SET status = 'cancelled', lease_owner = NULL, lease_expires_at = NULL, finished_at = now()
 WHERE group_id IN (SELECT id FROM closed) AND status IN ('held', 'pending', 'running')
"""

REQUEST_CANCEL = """
UPDATE lf_runs SET cancel_requested = true, cancel_reason = %(reason)s, updated_at = now()
 WHERE id = %(run_id)s
"""

#: A fenced commit was refused because the run was asked to cancel or passed its
#: deadline while the state ran: the lease holder ends it so, and nothing else.
END_LEASED = """
WITH freed AS (
    UPDATE lf_locks l
       SET token = NULL, holder = NULL, holder_run = NULL, holder_state = NULL,
           expires_at = NULL, released_at = now()
      FROM lf_runs r
     WHERE r.id = %(run_id)s AND r.lease_token = %(token)s AND r.status = 'running'
       AND r.lease_expires_at > now() AND (r.cancel_requested OR r.run_deadline <= now())
       AND l.key = r.lock_key AND l.token = r.lock_token
), ended AS (
    UPDATE lf_runs
       SET status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'timed_out' END,
           error_code = CASE WHEN cancel_requested THEN %(cancelled)s ELSE %(timed_out)s END,
           error = CASE WHEN cancel_requested
                        THEN coalesce('cancelled: ' || cancel_reason, 'cancelled')
                        ELSE %(deadline_error)s END,
           step_seq = step_seq + 1, lease_token = NULL, lease_owner = NULL,
           lease_expires_at = NULL, claimed_at = NULL, finished_at = now(), updated_at = now(),
           lock_key = NULL, lock_token = NULL, lock_until = NULL
     WHERE id = %(run_id)s AND lease_token = %(token)s AND status = 'running'
       AND lease_expires_at > now() AND (cancel_requested OR run_deadline <= now())
    RETURNING id, step_seq, state, status, error, tenant
)
INSERT INTO lf_steps (run_id, seq, state, attempt, lease_token, worker, started_at,
                      finished_at, duration_ms, outcome, error, tenant)
SELECT id, step_seq - 1, state, %(step_attempt)s, %(token)s, %(worker)s, %(started_at)s,
       clock_timestamp(),
       (extract(epoch FROM clock_timestamp() - %(started_at)s) * 1000)::int, status, error,
       tenant
  FROM ended
RETURNING (SELECT status FROM ended)
"""

#: Does the run's version declare ``state`` (a state a run can be in)?
STATE_DECLARED = """
SELECT 1 FROM lf_runs r JOIN lf_transitions t
    ON t.workflow = r.workflow AND t.version = r.version AND t.to_state = %(state)s
 WHERE r.id = %(run_id)s
 LIMIT 1
"""

#: A finished run back to pending, at ``state``, with a fresh attempt budget.
REDRIVE = """
WITH moved AS (
    UPDATE lf_runs
       SET state = %(state)s, prev_state = state, status = 'pending', attempt = 0,
           max_attempts = coalesce(%(max_attempts)s, max_attempts), step_seq = step_seq + 1,
           error_code = NULL, error = NULL, output = NULL, finished_at = NULL,
           cancel_requested = false, cancel_reason = NULL, group_id = NULL, wait = NULL,
           wait_event = NULL, wait_deadline = NULL, signal = NULL,
           run_deadline = CASE WHEN %(run_timeout)s::float8 IS NULL THEN run_deadline
                               ELSE now() + %(run_timeout)s * interval '1 second' END,
           not_before = now(), redispatch_at = now() + %(dispatch_timeout)s * interval '1 second',
           updated_at = now()
     WHERE id = %(run_id)s AND status IN ('failed', 'cancelled', 'timed_out')
    RETURNING id, step_seq, prev_state, tenant
)
INSERT INTO lf_steps (run_id, seq, state, attempt, started_at, finished_at, outcome,
                      next_state, error, tenant)
SELECT id, step_seq - 1, prev_state, 0, now(), clock_timestamp(), 'redriven', %(state)s,
       %(note)s, tenant
  FROM moved
RETURNING seq + 1
"""

#: Waits whose deadline passed, by the database clock; a second sweeper skips them.
DUE_WAITS = """
SELECT id::text, state, step_seq, wait, workflow, version, priority
  FROM lf_runs
 WHERE wait_deadline <= now() AND status = 'waiting'
 ORDER BY wait_deadline
 LIMIT %(limit)s
   FOR UPDATE SKIP LOCKED
"""

#: Runs past their deadline, whatever their status; a second sweeper skips them.
DUE_DEADLINES = """
SELECT id::text, state, status, workflow, version, priority
  FROM lf_runs
 WHERE finished_at IS NULL AND run_deadline <= now()
 ORDER BY run_deadline
 LIMIT %(limit)s
   FOR UPDATE SKIP LOCKED
"""

SIGNALS_OF_RUN = """
SELECT signal_id, event, payload, received_at, consumed_at, consumed_seq
  FROM lf_signals WHERE run_id = %(run_id)s ORDER BY id
"""
