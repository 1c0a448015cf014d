"""Celery adapters: the app, one task per state, and the only code that publishes.

``celery -A leaseflow.tasks worker`` and ``celery -A leaseflow.tasks beat`` find the
app here as ``leaseflow.tasks.app``; it is built on first access, from the
``LEASEFLOW_*`` environment, so importing this package does no I/O.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from leaseflow.tasks import celery_app

        return celery_app.get_app()
    raise AttributeError(f"module 'leaseflow.tasks' has no attribute {name!r}")
