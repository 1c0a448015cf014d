"""JSON arguments of the command line: inline, ``@FILE`` or ``-`` (stdin)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import click

from leaseflow import errors

TOO_DEEP = "the JSON is nested too deeply"


def json_text(value: str, stdin: IO[bytes], *, option: str) -> str:
    """The text of a JSON option: inline JSON, ``@path`` (a file) or ``-`` (stdin)."""
    hint = f"'{option}'"
    if value == "-":
        raw, where = stdin.read(), "stdin"
    elif value.startswith("@"):
        where = value[1:]
        try:
            raw = Path(where).read_bytes()
        except OSError as exc:
            raise click.BadParameter(
                f"cannot read {where}: {exc.strerror or exc}", param_hint=hint
            ) from exc
    else:
        return value
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{where} is not UTF-8: {exc}", param_hint=hint) from exc


def parse_json(text: str, *, option: str, too_deep: Callable[[], errors.LeaseflowError]) -> Any:
    """The JSON value of an option; malformed is a usage error, too deeply nested the
    error ``too_deep`` makes (the parser's own recursion must not escape as a
    traceback)."""
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise too_deep() from exc
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=f"'{option}'") from exc
