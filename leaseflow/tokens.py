"""The HTTP API's bearer tokens: created once (printed, never stored), kept as an scrypt
hash, scoped to a tenant or admin, revocable at once.

A token reads ``lft_<id>_<secret>``: the id finds its row, the secret is checked against
the row's scrypt hash (slow on purpose, so a stolen table does not yield tokens). A
verified token is remembered by this process (by a SHA-256 of it), but its row is read
on every request, so a revoked token is refused at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from leaseflow import errors
from leaseflow.store import token_sql
from leaseflow.store.postgres import PostgresStore

PREFIX = "lft_"
#: scrypt's cost: ~50 ms and 16 MiB per check, once per token and process.
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: a tenant's token, or an admin (every tenant)."""

    name: str
    tenant: str
    admin: bool


@dataclass(frozen=True, slots=True)
class TokenRecord:
    name: str
    tenant: str
    admin: bool
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tenant": self.tenant,
            "admin": self.admin,
            "created_at": self.created_at.isoformat(),
            "last_used_at": self.last_used_at and self.last_used_at.isoformat(),
            "revoked_at": self.revoked_at and self.revoked_at.isoformat(),
        }


class InvalidToken(errors.LeaseflowError, ValueError):
    """A token name or tenant that cannot be used, or a name already taken."""

    code = "E-TOKEN-INVALID"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash`` (base64) of ``secret``."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    n, r, p, dklen = SCRYPT["n"], SCRYPT["r"], SCRYPT["p"], SCRYPT["dklen"]
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=dklen)
    encoded = [base64.b64encode(part).decode() for part in (salt, digest)]
    return "$".join(["scrypt", str(n), str(r), str(p), *encoded])


def check_secret(secret: str, stored: str) -> bool:
    """Does ``secret`` match ``stored`` (``hash_secret``'s form)? Constant time."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(
            secret.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(want),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def _check_name(name: str, what: str) -> str:
    if not name or len(name) > 100 or not set(name) <= NAME_CHARS:
        raise InvalidToken(f"{what} {name!r} is invalid: 1 to 100 letters, digits or ._-")
    return name


class Tokens:
    """The tokens of one database (``lf_tokens``)."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self._verified: dict[bytes, Principal] = {}  # sha256(token) -> who, once checked
        self._lock = threading.Lock()

    def create(self, name: str, *, tenant: str = "default", admin: bool = False) -> str:
        """A new token; returns it (the only time it is seen). ``InvalidToken`` when
        the name is taken by a token not revoked."""
        _check_name(name, "token name")
        _check_name(tenant, "tenant")
        token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        params = {
            "id": token_id,
            "name": name,
            "tenant": tenant,
            "admin": admin,
            "hash": hash_secret(secret),
        }
        with self.store.connection() as conn:
            if conn.execute(token_sql.CREATE, params).fetchone() is None:
                raise InvalidToken(f"a token named {name!r} exists: revoke it first")
        return f"{PREFIX}{token_id}_{secret}"

    def list(self, *, revoked: bool = False) -> list[TokenRecord]:
        with self.store.connection() as conn:
            rows = conn.execute(token_sql.LIST, {"revoked": revoked}).fetchall()
        return [TokenRecord(*row) for row in rows]

    def revoke(self, name: str) -> bool:
        """Revoke the token ``name`` at once; False if there is none."""
        with self.store.connection() as conn:
            return conn.execute(token_sql.REVOKE, {"name": name}).fetchone() is not None

    def any_active(self) -> bool:
        with self.store.connection() as conn:
            row = conn.execute(token_sql.ANY_ACTIVE).fetchone()
        return bool(row and row[0])

    def verify(self, token: str) -> Principal | None:
        """Who ``token`` is, or None (unknown, malformed, wrong secret, revoked)."""
        if not token.startswith(PREFIX) or token.count("_") < 2:
            return None
        token_id, _, secret = token[len(PREFIX) :].partition("_")
        with self.store.connection() as conn:
            row = conn.execute(token_sql.FIND, {"id": token_id}).fetchone()
            if row is None:
                return None
            stored, tenant, admin, name = row
            key = hashlib.sha256(token.encode()).digest()
            with self._lock:
                known = self._verified.get(key)
            if known is None:
                if not check_secret(secret, stored):
                    return None
                known = Principal(name=name, tenant=tenant, admin=admin)
                with self._lock:
                    self._verified[key] = known
            conn.execute(token_sql.TOUCH, {"id": token_id})
        return known
