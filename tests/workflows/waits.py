"""Workflows of the wait, signal, cancel, re-drive, version and priority tests, imported
by test processes and by real worker subprocesses (``LEASEFLOW_WORKFLOWS``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Failed, Retry, Wait, Workflow


class Review(BaseModel):
    answer: Any = None
    marker: str | None = None  # a file whose existence lets ``fragile`` succeed
    prepared: int = 0


#: draft -> decide (waits for "review", an hour at most) -> route -> approved | rejected
approval = Workflow("wait_approval", context=Review)


@approval.state(initial=True, to=["decide"])
def draft(ctx: Any) -> str:
    return "decide"


@approval.state(to=["route", "expired"])
def decide(ctx: Any) -> Wait:
    return Wait(event="review", next="route", timeout=3600, on_timeout="expired")


@approval.state(to=["approved", "rejected"])
def route(ctx: Any) -> str:
    ctx.data.answer = ctx.signal
    return "approved" if ctx.signal.get("approve") else "rejected"


@approval.state()
def approved(ctx: Any) -> Complete:
    return Complete(output={"approved_with": ctx.data.answer})


@approval.state(end="failed")
def rejected(ctx: Any) -> Failed:
    return Failed(f"rejected: {ctx.data.answer.get('why')}", code="REJECTED")


@approval.state()
def expired(ctx: Any) -> Complete:
    return Complete(output="expired")


#: park waits for "go" (a second at most when the input asks: -> late); then done.
gate = Workflow("wait_gate", context=Review)


@gate.state(initial=True, to=["done", "late"])
def park(ctx: Any) -> Wait:
    timeout = 1.0 if ctx.data.marker == "short" else None
    return Wait(event="go", next="done", timeout=timeout, on_timeout="late")


@gate.state()
def done(ctx: Any) -> Complete:
    return Complete(output=ctx.signal)


@gate.state()
def late(ctx: Any) -> Complete:
    return Complete(output="late")


#: work runs until it learns it was cancelled (30 s at most), then asks for "after".
cancellable = Workflow("wait_cancellable", context=Review)


@cancellable.state(initial=True, to=["after"])
def work(ctx: Any) -> str:
    deadline = time.monotonic() + 30
    while not ctx.cancel_requested() and time.monotonic() < deadline:
        time.sleep(0.02)
    return "after"


@cancellable.state()
def after(ctx: Any) -> Complete:
    return Complete(output="the next state ran")


#: prepare -> fragile, which fails until its marker file exists (one attempt).
redrivable = Workflow("wait_redrivable", context=Review)


@redrivable.state(initial=True, to=["fragile"])
def prepare(ctx: Any) -> str:
    ctx.data.prepared += 1
    return "fragile"


@redrivable.state(retry=Retry(max_attempts=1))
def fragile(ctx: Any) -> Complete:
    if ctx.data.marker is None or not Path(ctx.data.marker).exists():
        raise RuntimeError("the marker is missing")
    return Complete(output={"prepared": ctx.data.prepared, "attempt": ctx.attempt})


#: One state: how a run's priority orders it among queued runs.
quick = Workflow("wait_quick", context=Review)


@quick.state(initial=True)
def only(ctx: Any) -> Complete:
    return Complete()
