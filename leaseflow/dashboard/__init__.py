"""The HTML dashboard of ``leaseflow serve``: server-rendered pages under ``/ui`` (``/``
leads there) over the same client and tokens as the JSON API, whose endpoints its
buttons call. ``install(app)`` adds it to an app."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from leaseflow.dashboard import access, routes


def install(app: FastAPI) -> None:
    """Add the pages, their static files and the redirect to the login page."""
    app.include_router(routes.router)
    app.mount(access.PREFIX + "/static", StaticFiles(directory=routes.HERE / "static"), "static")
    app.add_exception_handler(access.LoginNeeded, access.login_needed)
