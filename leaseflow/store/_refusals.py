"""What PostgreSQL refuses to store, checked by ``MemoryStore`` before it writes
anything, so a commit the database would refuse is refused here too."""

from __future__ import annotations

import math
from typing import Any

from leaseflow import errors
from leaseflow.fsm.rules import BranchDecision, Transition


def refuse_unstorable(what: str, decision: Transition | BranchDecision) -> None:
    """``UnstorableValue`` for what PostgreSQL refuses in a commit (``PostgresStore``
    maps its ``DataError``): a NUL byte or a lone surrogate in a text column or in a
    string or key of a JSON column, NaN or an infinity in a JSON column.

    Written apart from ``checkpoint.check`` on purpose: it stands for the database, the
    line behind the codec, and the tests switch the codec off to prove that line holds."""
    values: tuple[Any, ...]
    texts: tuple[str | None, ...]
    if isinstance(decision, Transition):
        items = None if decision.fork is None else decision.fork.items
        values = (decision.output, items)
        texts = (decision.error_code, decision.error, decision.step_error)
    else:
        values, texts = (decision.result,), (decision.error,)
    for value in values:
        why = _json_refusal(value)
        if why is not None:
            raise errors.UnstorableValue(what, why)
    for text in texts:
        why = None if text is None else _text_refusal(text)
        if why is not None:
            raise errors.UnstorableValue(what, why)


def _json_refusal(value: Any) -> str | None:
    if isinstance(value, str):
        return _text_refusal(value)
    if isinstance(value, float) and not math.isfinite(value):
        return f'invalid input syntax for type json: Token "{value}" is invalid.'
    if isinstance(value, dict):
        for key, item in value.items():
            why = _text_refusal(key) if isinstance(key, str) else None
            if why is not None or (why := _json_refusal(item)) is not None:
                return why
    elif isinstance(value, list | tuple):
        for item in value:
            if (why := _json_refusal(item)) is not None:
                return why
    return None


def _text_refusal(text: str) -> str | None:
    if "\x00" in text:
        return "text cannot contain NUL (0x00) bytes"
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return "text is not UTF-8 (a lone surrogate)"
    return None


def refuse_json(what: str, value: Any) -> None:
    """``UnstorableValue`` for a value a JSONB column refuses."""
    why = _json_refusal(value)
    if why is not None:
        raise errors.UnstorableValue(what, why)
