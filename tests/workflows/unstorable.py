"""Workflows whose states produce what the store cannot take (``tests/integration/
test_fail_closed.py``). The run input says what: ``nul`` (a NUL byte in the output),
``deep`` (an output nested 5,000 levels deep), ``context`` (a NUL byte in the context);
in ``unstorable_fan`` a NUL byte in the branch result, or (``items``) in a Map item.
Every state has retries left, to show that a refusal is never retried."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Map, Parallel, Retry, Workflow

RETRY = Retry(max_attempts=3, backoff=0)


class Bad(BaseModel):
    what: str = "nul"
    note: str = ""


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


emitting = Workflow("unstorable_emit", context=Bad)


@emitting.state(initial=True, retry=RETRY)
def emit(ctx: Any) -> Complete:
    if ctx.data.what == "deep":
        return Complete(output={"tree": nested(5000)})
    if ctx.data.what == "context":
        ctx.data.note = "a\x00b"
        return Complete(output={"ok": True})
    return Complete(output={"text": "a\x00b"})


fanning = Workflow("unstorable_fan", context=Bad)


@fanning.state(initial=True, to=["joined"], retry=RETRY)
def spread(ctx: Any) -> Parallel | Map:
    if ctx.data.what == "items":
        return Map(items=[1, {"text": "a\x00b"}], branch="leaf", join="joined")
    return Parallel(branches=["leaf"], join="joined")


@fanning.state(branch=True, retry=RETRY)
def leaf(ctx: Any) -> Any:
    return {"text": "a\x00b"}


@fanning.state(retry=RETRY)
def joined(ctx: Any) -> Complete:
    return Complete(output={"results": ctx.branch_results})
