"""SQL of the HTTP API's tokens (``lf_tokens``, see ``leaseflow.tokens``)."""

CREATE = """
INSERT INTO lf_tokens (id, name, tenant, admin, hash)
VALUES (%(id)s, %(name)s, %(tenant)s, %(admin)s, %(hash)s)
ON CONFLICT (name) WHERE revoked_at IS NULL DO NOTHING
RETURNING created_at
"""

LIST = """
SELECT name, tenant, admin, created_at, last_used_at, revoked_at FROM lf_tokens
 WHERE revoked_at IS NULL OR %(revoked)s
 ORDER BY created_at, name
"""

REVOKE = """
UPDATE lf_tokens SET revoked_at = now() WHERE name = %(name)s AND revoked_at IS NULL
RETURNING id
"""

#: The token of ``id`` while it is not revoked: its hash, tenant and admin flag.
FIND = "SELECT hash, tenant, admin, name FROM lf_tokens WHERE id = %(id)s AND revoked_at IS NULL"

#: A minute's resolution is enough for "last used", and spares a write per request.
TOUCH = """
UPDATE lf_tokens SET last_used_at = now()
 WHERE id = %(id)s AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')
"""

ANY_ACTIVE = "SELECT EXISTS (SELECT 1 FROM lf_tokens WHERE revoked_at IS NULL)"
