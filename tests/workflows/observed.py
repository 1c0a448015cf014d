"""A run whose life touches a retry, a Parallel and a wait for a signal: the JSON log
test rebuilds it from log lines (tests/integration/test_json_logs.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Parallel, Retry, Wait, Workflow


class Life(BaseModel):
    width: int = 2


#: charge (fails once, retried) -> fan (Parallel of `leg`) -> joined -> approve (waits
#: for "go") -> done
life = Workflow("logs_life", context=Life)


@life.state(initial=True, to=["fan"], retry=Retry(max_attempts=2, backoff=0.05, jitter=0))
def charge(ctx: Any) -> str:
    if ctx.attempt == 1:
        raise ConnectionError("gateway timed out")
    return "fan"


@life.state(to=["joined"])
def fan(ctx: Any) -> Parallel:
    return Parallel(branches=["leg"] * ctx.data.width, join="joined")


@life.state(branch=True)
def leg(ctx: Any) -> int:
    return int(ctx.index)


@life.state(to=["approve"])
def joined(ctx: Any) -> str:
    return "approve"


@life.state(to=["done"])
def approve(ctx: Any) -> Wait:
    return Wait(event="go", next="done")


@life.state()
def done(ctx: Any) -> Complete:
    return Complete(output={"signal": ctx.signal})
