"""Resource lock keys of states, as pure functions: a state's ``lock=`` template is
checked against the context model when the workflow is declared, and formatted from
the context when the state is entered."""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from leaseflow import errors

#: The longest lock key (after formatting).
MAX_KEY = 200


def template_fields(template: str) -> list[str]:
    """The field names a ``lock=`` template formats (``"db:{tenant}"`` -> ``["tenant"]``);
    ``ValueError`` for a malformed template."""
    fields: list[str] = []
    for _text, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not field or spec or conversion:
            raise ValueError(
                "a lock template names context fields as {field}, with no format spec or conversion"
            )
        fields.append(field)
    return fields


def template_problems(template: object, context: type[BaseModel]) -> list[str]:
    """What is wrong with a state's ``lock=`` for a context model (empty when sound)."""
    if not isinstance(template, str) or not template.strip():
        return ["has a lock= that is not a non-empty string"]
    try:
        fields = template_fields(template)
    except ValueError as exc:
        return [f"has lock={template!r}: {exc}"]
    known = set(context.model_fields)
    return [
        f"has lock={template!r}, which names {{{field}}}: not a field of the context "
        f"{context.__name__} (fields: {', '.join(sorted(known)) or 'none'})"
        for field in fields
        if field not in known
    ]


def key(template: str, data: BaseModel | Mapping[str, Any]) -> str:
    """The lock key of ``template`` for the context ``data``; ``InvalidLockKey`` when
    a field it names is missing or empty, or the key is too long."""
    values = data.model_dump(mode="json") if isinstance(data, BaseModel) else dict(data)
    try:
        fields = template_fields(template)
    except ValueError as exc:
        raise errors.InvalidLockKey(template, str(exc)) from None
    for field in fields:
        value = values.get(field)
        if value is None or value == "":
            raise errors.InvalidLockKey(template, f"the context's {field!r} is empty")
    formatted = template.format(**{field: values[field] for field in fields})
    if len(formatted) > MAX_KEY:
        raise errors.InvalidLockKey(template, f"the key is over {MAX_KEY} characters")
    return formatted
