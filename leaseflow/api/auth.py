"""Who a request acts as, and the client it acts through.

Once any token is active, every endpoint but ``/healthz`` requires
``Authorization: Bearer <token>`` (401 otherwise); a token's row is read on every
request, so a revoked token is refused at once. With no token at all, a request from
a loopback address acts as an admin (``leaseflow serve`` binds only to loopback
then); from any other address it is refused. A tenant's token acts through
``client.for_tenant(tenant)`` (row-level security); an admin's through the engine
client, which sees every tenant.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from leaseflow import tokens
from leaseflow.api import errors
from leaseflow.client import Client

#: How long "is any token active?" is remembered (seconds).
ACTIVE_TTL = 1.0
#: Who a request acts as when no token exists (loopback clients only).
LOCAL = tokens.Principal(name="loopback", tenant="default", admin=True)

bearer = HTTPBearer(auto_error=False, description="A token of `leaseflow tokens create`.")


def is_loopback(host: str | None) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Gate:
    """Checks tokens for one app: remembers whether any is active for ``ACTIVE_TTL``."""

    def __init__(self, tokens_: tokens.Tokens, *, ttl: float = ACTIVE_TTL) -> None:
        self.tokens = tokens_
        self.ttl = ttl
        self._active: tuple[float, bool] | None = None
        self._lock = threading.Lock()

    def any_active(self) -> bool:
        now = time.monotonic()
        with self._lock:
            known = self._active
        if known is not None and now - known[0] < self.ttl:
            return known[1]
        active = self.tokens.any_active()
        with self._lock:
            self._active = (now, active)
        return active

    def principal(self, token: str | None, peer: str | None) -> tokens.Principal:
        """Who presents ``token`` (None: no header) from ``peer``; ``Unauthorized``."""
        if token is not None:
            found = self.tokens.verify(token)
            if found is None:
                raise errors.Unauthorized("the token is unknown, malformed or revoked")
            return found
        if self.any_active():
            raise errors.Unauthorized("this endpoint requires Authorization: Bearer <token>")
        if not is_loopback(peer):
            raise errors.Unauthorized(
                "no token is configured: only loopback clients are served; create one with "
                "`leaseflow tokens create`"
            )
        return LOCAL


def principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> tokens.Principal:
    """The request's principal (a dependency); 401 when it has none."""
    engine = request.app.state.engine
    header = request.headers.get("authorization")
    if header is not None and credentials is None:  # not "Bearer <token>"
        raise errors.Unauthorized("the Authorization header must read Bearer <token>")
    token = credentials.credentials if credentials is not None else None
    peer = request.client.host if request.client is not None else None
    who: tokens.Principal = engine.gate.principal(token, peer)
    return who


Who = Annotated[tokens.Principal, Depends(principal)]


def admin(who: Who) -> tokens.Principal:
    """An admin principal (a dependency); 403 for a tenant's token."""
    if not who.admin:
        raise errors.Forbidden(f"token {who.name!r} is a tenant's: this endpoint is admin only")
    return who


Admin = Annotated[tokens.Principal, Depends(admin)]


def client_for(request: Request, who: tokens.Principal) -> Client:
    """The client ``who`` acts through: the engine's (admin) or its tenant's view."""
    engine: Client = request.app.state.engine.client
    return engine if who.admin else engine.for_tenant(who.tenant)


def scoped(request: Request, who: Who) -> Client:
    return client_for(request, who)


Scoped = Annotated[Client, Depends(scoped)]
