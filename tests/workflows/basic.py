"""Small workflows the tests (and worker subprocesses) share.

Behaviour is steered by the run input, so one definition serves many tests:
``sleep`` seconds in the slow state, ``fail_times`` errors before succeeding.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Failed, Retry, Workflow


class Linear(BaseModel):
    n: int = 0
    trail: list[str] = []


linear = Workflow("linear5", context=Linear)


@linear.state(initial=True, to=["s2"])
def s1(ctx: Any) -> str:
    ctx.data.trail.append("s1")
    return "s2"


@linear.state(to=["s3"])
def s2(ctx: Any) -> str:
    ctx.data.trail.append("s2")
    return "s3"


@linear.state(to=["s4"])
def s3(ctx: Any) -> str:
    ctx.data.trail.append("s3")
    return "s4"


@linear.state(to=["s5"])
def s4(ctx: Any) -> str:
    ctx.data.trail.append("s4")
    return "s5"


@linear.state()
def s5(ctx: Any) -> Complete:
    ctx.data.trail.append("s5")
    return Complete(output={"n": ctx.data.n, "trail": ctx.data.trail})


class Slow(BaseModel):
    sleep: float = 0.0
    max_attempts: int = 3
    started: int = 0


slow = Workflow("slow3", context=Slow)


@slow.state(initial=True, to=["work"])
def begin(ctx: Any) -> str:
    return "work"


@slow.state(to=["finish"], retry=Retry(max_attempts=2, backoff=0.05))
def work(ctx: Any) -> str:
    time.sleep(ctx.data.sleep)
    return "finish"


@slow.state()
def finish(ctx: Any) -> Complete:
    return Complete(output={"done": True})


class Flaky(BaseModel):
    fail_times: int = 0
    mode: str = "next"  # next | illegal | fail | bad_output | huge


flaky = Workflow("flaky", context=Flaky)


@flaky.state(initial=True, to=["shaky"])
def enter(ctx: Any) -> str:
    return "shaky"


@flaky.state(to=["done"], retry=Retry(max_attempts=3, backoff=0.01, jitter=0))
def shaky(ctx: Any) -> Any:
    if ctx.attempt <= ctx.data.fail_times:
        raise ConnectionError(f"transient failure on attempt {ctx.attempt}")
    if ctx.data.mode == "illegal":
        return "enter"
    if ctx.data.mode == "fail":
        return Failed("business rule said no", code="APP-REFUSED")
    return "done"


@flaky.state()
def done(ctx: Any) -> Complete:
    if ctx.data.mode == "bad_output":
        return Complete(output={"when": object()})
    if ctx.data.mode == "huge":
        return Complete(output="x" * (2 * 1024 * 1024))
    return Complete(output={"ok": True})


class Recovering(BaseModel):
    fail_times: int = 5


recovering = Workflow("recovering", context=Recovering)


@recovering.state(
    initial=True, to=["ok"], on_error="fallback", retry=Retry(max_attempts=2, backoff=0)
)
def risky(ctx: Any) -> str:
    raise ValueError("always broken")


@recovering.state()
def ok(ctx: Any) -> Complete:
    return Complete(output="ok")


@recovering.state()
def fallback(ctx: Any) -> Complete:
    return Complete(output="fallback")


class Timed(BaseModel):
    sleep: float = 5.0


timed = Workflow("timed", context=Timed)


@timed.state(initial=True, to=["after"], timeout=1.0, retry=Retry(max_attempts=2, backoff=0))
def bounded(ctx: Any) -> str:
    if ctx.attempt == 1:
        time.sleep(ctx.data.sleep)  # interrupted by the soft time limit
    return "after"


@timed.state()
def after(ctx: Any) -> Complete:
    return Complete(output={"attempts": ctx.attempt})


class InlineChain(BaseModel):
    trail: list[str] = []
    fail_at: str | None = None  # the state that raises ConnectionError ...
    fail_times: int = 0  # ... on its first ``fail_times`` attempts


inline_chain = Workflow("inline_chain", context=InlineChain)


def _visit(ctx: Any, target: str) -> str:
    if ctx.data.fail_at == ctx.state and ctx.attempt <= ctx.data.fail_times:
        raise ConnectionError(f"transient failure in {ctx.state} attempt {ctx.attempt}")
    ctx.data.trail.append(f"{ctx.state}#{ctx.attempt}")
    return target


@inline_chain.state(initial=True, to=["b"])
def a(ctx: Any) -> str:
    return _visit(ctx, "b")


@inline_chain.state(to=["c"], inline=True)
def b(ctx: Any) -> str:
    return _visit(ctx, "c")


@inline_chain.state(to=["d"], inline=True, retry=Retry(max_attempts=3, backoff=0, jitter=0))
def c(ctx: Any) -> str:
    return _visit(ctx, "d")


@inline_chain.state(to=["e"], inline=True, queue="inline-other")  # another queue: published
def d(ctx: Any) -> str:
    return _visit(ctx, "e")


@inline_chain.state(inline=True, queue="inline-other")  # same queue as d: inlined after it
def e(ctx: Any) -> Complete:
    ctx.data.trail.append(f"e#{ctx.attempt}")
    return Complete(output={"trail": ctx.data.trail})
