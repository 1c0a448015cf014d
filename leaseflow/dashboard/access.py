"""Who looks at the dashboard: the API's rule, with the token in a cookie.

With no token configured, loopback clients see every page (as the API serves them);
once a token exists, the pages need one: ``/ui/login`` takes it once and keeps it
in the ``leaseflow_dashboard`` cookie (HttpOnly, SameSite=Strict, Path=/ui, Secure
over HTTPS), checked like a bearer token on every page (a revoked one is refused at
once). The page's JavaScript keeps the same token in ``sessionStorage`` for the
buttons, which call the JSON API with ``Authorization: Bearer``; the API never
reads the cookie, so a cross-site request cannot act through it.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qs, quote

from fastapi import Depends, Request
from fastapi.responses import RedirectResponse, Response

from leaseflow import tokens
from leaseflow.api import auth
from leaseflow.api import errors as api_errors
from leaseflow.client import Client

COOKIE = "leaseflow_dashboard"
PREFIX = "/ui"
#: How long the cookie lasts (seconds); the token's own revocation ends it sooner.
MAX_AGE = 12 * 3600


class LoginNeeded(Exception):
    """A page was asked for without a usable token: the login page answers."""

    def __init__(self, why: str, path: str) -> None:
        super().__init__(why, path)
        self.why = why
        self.path = path


def peer_of(request: Request) -> str | None:
    return request.client.host if request.client is not None else None


def viewer(request: Request) -> tokens.Principal:
    """The page's principal (a dependency): by the cookie's token, else loopback."""
    token = request.cookies.get(COOKIE) or None
    try:
        who: tokens.Principal = request.app.state.engine.gate.principal(token, peer_of(request))
    except api_errors.Unauthorized as exc:
        raise LoginNeeded(str(exc), request.url.path) from None
    return who


Viewer = Annotated[tokens.Principal, Depends(viewer)]


def client_of(request: Request, who: Viewer) -> Client:
    return auth.client_for(request, who)


Reader = Annotated[Client, Depends(client_of)]


def safe_next(path: str | None) -> str:
    """Where to go after logging in: a dashboard path, never another site."""
    if path and path.startswith(PREFIX + "/") and not path.startswith("//"):
        return path
    return PREFIX + "/"


async def login_needed(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginNeeded)
    target = f"{PREFIX}/login?next={quote(exc.path)}"
    response = RedirectResponse(target, status_code=303)
    if request.cookies.get(COOKIE):  # unknown or revoked: forget it
        response.delete_cookie(COOKIE, path=PREFIX)
    return response


async def token_of(request: Request) -> str:
    """The ``token`` field of a urlencoded form (no multipart parser needed)."""
    body = (await request.body())[:10_000].decode("utf-8", "replace")
    return (parse_qs(body).get("token") or [""])[0].strip()


def check(request: Request, token: str) -> str | None:
    """None when ``token`` is good (or none is needed here), else why not."""
    try:
        request.app.state.engine.gate.principal(token or None, peer_of(request))
    except api_errors.Unauthorized as exc:
        return str(exc)
    return None


def logged_in(request: Request, token: str, next_path: str) -> Response:
    response = RedirectResponse(safe_next(next_path), status_code=303)
    if token:
        response.set_cookie(
            COOKIE,
            token,
            max_age=MAX_AGE,
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
    return response


def logged_out() -> Response:
    response = RedirectResponse(PREFIX + "/login", status_code=303)
    response.delete_cookie(COOKIE, path=PREFIX)
    return response
