"""Workflows for the crash tests (``tests/integration/test_crash.py``).

``crash`` is begin -> work | fragile -> finish. ``work`` and ``fragile`` sleep
``ctx.data.sleep`` seconds on their first attempt only, so a worker can be killed
or paused in the middle of them while the recovered attempt is quick. ``work``
allows three attempts, ``fragile`` one (a lease that expires on it fails the run).

Every state records its effect in the application table ``crash_effects`` through
``ctx.in_commit``: a row lands exactly when the state's transition commits, so the
table shows which attempt's effect was committed, and with which lease.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Retry, Workflow

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS crash_effects (
    run_id uuid NOT NULL,
    state text NOT NULL,
    attempt int NOT NULL,
    lease_token uuid NOT NULL,
    pid int NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


def create_effects_table(conn: Any) -> None:
    """Create ``crash_effects`` (the test does it before any worker runs a state)."""
    conn.execute(EFFECTS_DDL)


class Crash(BaseModel):
    sleep: float = 0.0  # seconds the slow state sleeps, on its first attempt only
    fragile: bool = False  # take ``fragile`` (one attempt) instead of ``work``


crash = Workflow("crash", context=Crash)


def _record(ctx: Any) -> None:
    row = (ctx.run_id, ctx.state, ctx.attempt, ctx.fencing_token, os.getpid())

    def write(conn: Any) -> None:
        conn.execute(
            "INSERT INTO crash_effects (run_id, state, attempt, lease_token, pid) "
            "VALUES (%s, %s, %s, %s, %s)",
            row,
        )

    ctx.in_commit(write)


def _slow_on_first_attempt(ctx: Any) -> None:
    if ctx.attempt == 1:
        time.sleep(ctx.data.sleep)


@crash.state(initial=True, to=["work", "fragile"])
def begin(ctx: Any) -> str:
    _record(ctx)
    return "fragile" if ctx.data.fragile else "work"


@crash.state(to=["finish"], retry=Retry(max_attempts=3, backoff=0.05))
def work(ctx: Any) -> str:
    _slow_on_first_attempt(ctx)
    _record(ctx)
    return "finish"


@crash.state(to=["finish"], retry=Retry(max_attempts=1))
def fragile(ctx: Any) -> str:
    _slow_on_first_attempt(ctx)
    _record(ctx)
    return "finish"


@crash.state()
def finish(ctx: Any) -> Complete:
    _record(ctx)
    return Complete(output={"done": True})


#: The same states with ``work``, ``fragile`` and ``finish`` declared ``inline=True``:
#: a worker runs begin -> work -> finish in one task, the commit of each state handing
#: the next one's lease straight to it (inline continuation).
crash_inline = Workflow("crash_inline", context=Crash)
crash_inline.state(initial=True, to=["work", "fragile"], name="begin")(begin)
crash_inline.state(to=["finish"], retry=Retry(max_attempts=3, backoff=0.05), inline=True)(work)
crash_inline.state(to=["finish"], retry=Retry(max_attempts=1), inline=True)(fragile)
crash_inline.state(inline=True)(finish)
