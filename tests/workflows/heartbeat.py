"""Workflows for the heartbeat tests (``tests/integration/test_heartbeat.py``).

``hb_outlive`` is begin -> long -> done. ``long`` sleeps ``ctx.data.sleep`` seconds,
several times the lease TTL, and never calls ``ctx.heartbeat()``: only the worker's
heartbeat thread keeps its lease alive. It allows two attempts, so a lease that ran
out would show in the step log as a reaped attempt followed by a second one.

``hb_probe`` is one state that hands its ``ctx`` to the hooks of :data:`IN_STATE`
(a test calls ``ctx.heartbeat()`` or reads ``ctx.lease_lost()`` there), then completes.
It allows two attempts, so a reaped lease sends the run back to pending.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Retry, Workflow


class Long(BaseModel):
    sleep: float = 6.0


outlive = Workflow("hb_outlive", context=Long)


@outlive.state(initial=True, to=["long"])
def begin(ctx: Any) -> str:
    return "long"


@outlive.state(to=["done"], retry=Retry(max_attempts=2, backoff=0))
def long(ctx: Any) -> str:
    time.sleep(ctx.data.sleep)
    return "done"


@outlive.state()
def done(ctx: Any) -> Complete:
    return Complete(output={"slept": ctx.data.sleep})


class Empty(BaseModel):
    pass


#: Called with the ``ctx`` of ``hb_probe.look``, in order (a test appends and removes).
IN_STATE: list[Callable[[Any], None]] = []

probe = Workflow("hb_probe", context=Empty)


@probe.state(initial=True, retry=Retry(max_attempts=2, backoff=0))
def look(ctx: Any) -> Complete:
    for hook in IN_STATE:
        hook(ctx)
    return Complete()
