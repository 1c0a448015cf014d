"""Every error of the API as JSON ``{"code": "E-...", "message": "...", "detail": {...}}``.

Leaseflow errors map to a status by class; a request the models refuse is 422
``E-REQUEST-INVALID``; an unreachable database 503; anything else a 500 naming an
error id, logged with that id and its traceback (never a traceback in a response).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from leaseflow import errors, logs, tokens
from leaseflow.api import models

REQUEST_INVALID = "E-REQUEST-INVALID"
INTERNAL = "E-INTERNAL"


class _Refusal(errors.LeaseflowError):
    """An error of the API itself: a sentence, no fields."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


class Unauthorized(_Refusal):
    """No token, or one that is unknown, malformed or revoked."""

    code = "E-AUTH-REQUIRED"


class Forbidden(_Refusal):
    """A tenant's token on an admin endpoint (or naming another tenant)."""

    code = "E-FORBIDDEN"


class BadRequest(_Refusal):
    """A request value the API cannot use (a malformed cursor)."""

    code = REQUEST_INVALID


DESCRIPTIONS = {
    401: "No token, or an unknown, malformed or revoked one",
    403: "A tenant's token on an admin endpoint",
    404: "Not found (another tenant's run too)",
    409: "Illegal for the run's status, or a conflict",
    413: "A payload over LEASEFLOW_MAX_PAYLOAD_BYTES",
    422: "Invalid request or input (E-REQUEST-INVALID, E-CONTEXT-INVALID, ...)",
    500: "Unexpected error: the body names an error id the server logged",
    503: "The database is unavailable",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error responses of an endpoint, for its OpenAPI."""
    return {s: {"model": models.ErrorOut, "description": DESCRIPTIONS[s]} for s in statuses}


#: Errors any authenticated endpoint may answer.
AUTHED = (401, 422, 503)


#: Status by error class; the first class of the exception's MRO listed wins.
STATUS: dict[type[errors.LeaseflowError], int] = {
    Unauthorized: 401,
    Forbidden: 403,
    errors.RunNotFound: 404,
    errors.ArtifactNotFound: 404,
    errors.UnknownWorkflow: 404,
    errors.LockNotFound: 404,
    errors.RunFinished: 409,
    errors.RunActive: 409,  # and RunNotFinished (a purge of an active run)
    errors.RunCompleted: 409,
    errors.RunExists: 409,
    errors.LockHeld: 409,
    errors.IdempotencyConflict: 409,
    errors.PayloadTooLarge: 413,
    BadRequest: 422,
    errors.InvalidInput: 422,
    errors.InvalidSignal: 422,
    errors.UnknownState: 422,
    errors.InvalidArtifact: 422,
    errors.UnstorableValue: 422,
    tokens.InvalidToken: 422,
    errors.StoreUnavailable: 503,
    errors.SchemaMissing: 503,
}


def status_of(exc: errors.LeaseflowError) -> int | None:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return None


def _plain(value: Any) -> Any:
    """``value`` if JSON-ready (str, number, bool, None, lists of those), else its str."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def detail_of(exc: errors.LeaseflowError) -> dict[str, Any]:
    """The exception's public fields (``run_id``, ``key``, ``limit`` ...)."""
    return {k: _plain(v) for k, v in vars(exc).items() if not k.startswith("_")}


def error_response(
    status: int, code: str, message: str, detail: dict[str, Any] | None = None
) -> JSONResponse:
    body = {"code": code, "message": message, "detail": detail or {}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def unexpected(exc: BaseException) -> JSONResponse:
    """A 500 naming a fresh error id; the traceback goes to the log under that id."""
    error_id = uuid.uuid4().hex[:16]
    logs.logger.error(
        "action=api_error error_id=%s error=%r",
        error_id,
        exc,
        exc_info=exc,
        extra={"action": "api_error", "error_id": error_id},
    )
    message = f"unexpected error {error_id}: the server's log has its details"
    return error_response(500, INTERNAL, message, {"error_id": error_id})


def _leaseflow(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.LeaseflowError)
    status = status_of(exc)
    if status is None:
        return unexpected(exc)
    return error_response(status, exc.code, str(exc), detail_of(exc))


def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    found = [
        {
            "loc": [_plain(part) for part in err.get("loc", ())],
            "msg": str(err.get("msg", "")),
            "type": str(err.get("type", "")),
        }
        for err in exc.errors()
    ]
    first = found[0] if found else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"])
    message = f"invalid request: {where}: {first['msg']}" if where else str(first["msg"])
    return error_response(422, REQUEST_INVALID, message, {"errors": found})


def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400:  # FastAPI could not parse the body (e.g. nested too deeply)
        return error_response(422, REQUEST_INVALID, f"invalid request: {exc.detail}")
    codes = {404: "E-NOT-FOUND", 405: "E-METHOD-NOT-ALLOWED"}
    code = codes.get(exc.status_code, f"E-HTTP-{exc.status_code}")
    return error_response(exc.status_code, code, str(exc.detail))


def _operational(request: Request, exc: Exception) -> JSONResponse:
    error = errors.StoreUnavailable(str(exc).strip() or "the database is unreachable")
    return error_response(503, error.code, str(error))


def _data(request: Request, exc: Exception) -> JSONResponse:
    message = f"the database refused a value of the request: {str(exc).strip()}"
    return error_response(422, REQUEST_INVALID, message)


Handler = Callable[[Request, Exception], JSONResponse]


def install(app: FastAPI) -> None:
    """Register the handlers and the last-resort middleware on ``app``."""
    handlers: dict[type[Exception], Handler] = {
        errors.LeaseflowError: _leaseflow,
        RequestValidationError: _validation,
        HTTPException: _http,
        psycopg.OperationalError: _operational,
        psycopg.DataError: _data,
    }
    for cls, handler in handlers.items():
        app.add_exception_handler(cls, handler)
    app.add_middleware(CatchAll)


class CatchAll:
    """ASGI middleware: an exception no handler took becomes a JSON 500 (a
    ``RecursionError`` from a too deeply nested body a 422), never a traceback, and
    is not raised on to the server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:  # the response is on its way: nothing better to send
                logging.getLogger("leaseflow").error(
                    "action=api_error_late", exc_info=exc, extra={"action": "api_error_late"}
                )
                return
            if isinstance(exc, RecursionError):
                response = error_response(422, REQUEST_INVALID, "the JSON is nested too deeply")
            else:
                response = unexpected(exc)
            await response(scope, receive, send)
