"""The SQL of resource locks (see ``pg_locks``). A lock is held while its ``token`` is
set; every acquisition raises the key's ``fence``. Whoever frees a lock but its holder
(the sweeper, a forced release) writes an ``lf_lock_audit`` row in the same statement.
"""

#: Take ``key`` if it is free, or re-take it for the run that already holds it (a lock
#: held across states, or re-acquired after a reaped attempt): the fence grows either
#: way. No row back: held by someone else.
ACQUIRE = """
INSERT INTO lf_locks AS l (key, fence, token, holder, holder_run, holder_state, acquired_at,
                           expires_at, released_at)
VALUES (%(key)s, 1, gen_random_uuid(), %(holder)s, %(run_id)s, %(state)s, now(),
        now() + %(ttl)s * interval '1 second', NULL)
ON CONFLICT (key) DO UPDATE
   SET fence = l.fence + 1, token = excluded.token, holder = excluded.holder,
       holder_run = excluded.holder_run, holder_state = excluded.holder_state,
       acquired_at = now(), expires_at = excluded.expires_at, released_at = NULL
 WHERE l.token IS NULL
RETURNING fence, token::text
"""

#: A run's lock, held across states: still its own (the token it recorded)? Refreshed.
KEEP = """
UPDATE lf_locks
   SET expires_at = now() + %(ttl)s * interval '1 second', holder_state = %(state)s
 WHERE key = %(key)s AND token = %(token)s
RETURNING fence
"""

#: The claim's run records the lock it now holds, in the claim's transaction.
RECORD_ON_RUN = """
UPDATE lf_runs SET lock_key = %(key)s, lock_token = %(token)s, lock_until = %(until)s
 WHERE id = %(run_id)s
"""

#: A contended claim was rolled back: the run stays pending, tried again after a pause.
DEFER = """
UPDATE lf_runs
   SET not_before = now() + %(delay)s * interval '1 second',
       redispatch_at = now() + (%(delay)s + %(dispatch_timeout)s) * interval '1 second'
 WHERE id = %(run_id)s AND step_seq = %(seq)s AND status = 'pending'
"""

#: Who holds ``key`` (for the error of a contended ``locks.hold``).
HOLDER = "SELECT holder, acquired_at FROM lf_locks WHERE key = %(key)s AND token IS NOT NULL"

#: A guarded commit first locks its lock's row: a forced release or the sweeper waits
#: for it, or has already freed it (then the commit is refused).
GUARD = "SELECT fence FROM lf_locks WHERE key = %(key)s AND token = %(token)s FOR UPDATE"

RELEASE = """
UPDATE lf_locks
   SET token = NULL, holder = NULL, holder_run = NULL, holder_state = NULL,
       expires_at = NULL, released_at = now()
 WHERE key = %(key)s AND token = %(token)s
RETURNING fence
"""

#: Free the lock the run recorded, if it still holds it (the run ends).
RELEASE_OF_RUN = """
UPDATE lf_locks l
   SET token = NULL, holder = NULL, holder_run = NULL, holder_state = NULL,
       expires_at = NULL, released_at = now()
  FROM lf_runs r
 WHERE r.id = %(run_id)s AND l.key = r.lock_key AND l.token = r.lock_token
"""

#: ``locks.hold``'s lease, refreshed while its block runs.
REFRESH = """
UPDATE lf_locks SET expires_at = now() + %(ttl)s * interval '1 second'
 WHERE key = %(key)s AND token = %(token)s
RETURNING fence
"""

#: Free locks by someone else than their holder, auditing each: expired ones (the
#: sweeper; a second sweeper skips the rows the first holds) or one key (forced).
_FREE = """
WITH chosen AS ({choose}),
freed AS (
    UPDATE lf_locks l
       SET token = NULL, holder = NULL, holder_run = NULL, holder_state = NULL,
           expires_at = NULL, released_at = now()
      FROM chosen c
     WHERE l.key = c.key AND l.token = c.token
    RETURNING l.key, l.fence, c.token, c.holder, c.holder_run
)
INSERT INTO lf_lock_audit (key, fence, action, holder, holder_run, token, actor, reason)
SELECT key, fence, %(action)s, holder, holder_run, token, %(actor)s, %(reason)s FROM freed
RETURNING key, fence, holder, holder_run::text, reason
"""

SWEEP = _FREE.format(
    choose="""
    SELECT key, token, holder, holder_run FROM lf_locks
     WHERE token IS NOT NULL AND expires_at < now()
     ORDER BY expires_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED"""
)

FORCE = _FREE.format(
    choose="""
    SELECT key, token, holder, holder_run FROM lf_locks
     WHERE key = %(key)s AND token IS NOT NULL
       FOR UPDATE"""
)

LIST = """
SELECT key, fence, holder, holder_run::text, holder_state, acquired_at, expires_at,
       expires_at < now()
  FROM lf_locks WHERE token IS NOT NULL ORDER BY key LIMIT %(limit)s
"""

AUDIT = """
SELECT key, fence, action, holder, holder_run::text, actor, reason, at
  FROM lf_lock_audit WHERE %(key)s::text IS NULL OR key = %(key)s
 ORDER BY id DESC LIMIT %(limit)s
"""

#: The run no longer holds its lock (released by its commit).
FORGET_ON_RUN = """
UPDATE lf_runs SET lock_key = NULL, lock_token = NULL, lock_until = NULL
 WHERE id = %(run_id)s AND lock_token = %(token)s
"""

#: A claim handed back because its run's lock could not be had: pending again after a
#: pause, the attempt refunded.
UNCLAIM = """
UPDATE lf_runs
   SET status = 'pending', attempt = attempt - 1, lease_token = NULL, lease_owner = NULL,
       lease_expires_at = NULL, claimed_at = NULL,
       not_before = now() + %(delay)s * interval '1 second',
       redispatch_at = now() + (%(delay)s + %(dispatch_timeout)s) * interval '1 second',
       updated_at = now()
 WHERE id = %(run_id)s AND lease_token = %(token)s AND status = 'running'
"""
