"""Celery adapters: the app, one task per state, and the only code that publishes.

``celery -A leaseflow.tasks worker`` and ``celery -A leaseflow.tasks beat`` find
the app here.
"""

from leaseflow.tasks.celery_app import app, make_app

__all__ = ["app", "make_app"]
