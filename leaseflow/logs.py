"""Structured log lines: a stable snake_case ``action`` plus the ids, as key=value pairs.

Tests and operators match on ``action``, never on wording. The fields also travel
as ``extra`` (each, and all of them as ``lf_fields``) for ``leaseflow.logfmt``'s JSON.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("leaseflow")
#: The record attribute that holds an event's fields (what the JSON format writes).
FIELDS = "lf_fields"


def event(action: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log ``action`` with ``fields`` (run_id, state, step_seq, lease_token, ...)."""
    if not logger.isEnabledFor(level):
        return
    pairs = " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)
    logger.log(
        level, "action=%s %s", action, pairs, extra={"action": action, FIELDS: fields, **fields}
    )


def debug(action: str, /, **fields: Any) -> None:
    event(action, logging.DEBUG, **fields)


def info(action: str, /, **fields: Any) -> None:
    event(action, logging.INFO, **fields)


def warning(action: str, /, **fields: Any) -> None:
    event(action, logging.WARNING, **fields)


def error(action: str, /, **fields: Any) -> None:
    event(action, logging.ERROR, **fields)
