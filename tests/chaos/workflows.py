"""The chaos mix: four small workflows whose every state records its effect.

- ``chaos_linear``: a -> b -> c -> d, quick states.
- ``chaos_slow``: enter -> slow -> leave; ``slow`` sleeps ``ctx.data.slow`` seconds
  (the state a fault hits in the middle: kill, SIGSTOP, clock jump).
- ``chaos_flaky``: enter -> flaky -> leave; ``flaky`` raises a transient
  ``ConnectionError`` with probability ``ctx.data.p`` on its first two attempts (decided
  by a hash of run id and attempt, so a run's luck is reproducible), which leaves
  three of its five attempts to the faults.
- ``chaos_fan``: fork -> (``width`` x leg, a Parallel) -> gather -> leave.

Each state (not the branches: ``ctx.in_commit`` belongs to transitions) writes one
row into the application table ``chaos_effects`` through ``ctx.in_commit``: the row
commits exactly when the state's transition does, with the lease token that
fenced it. ``gather`` also records the branch results it saw. The invariants of
``tests/chaos/invariants.py`` read this table against ``lf_steps``.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from psycopg.types.json import Jsonb
from pydantic import BaseModel

from leaseflow import Complete, Parallel, Retry, Workflow

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS chaos_effects (
    run_id uuid NOT NULL,
    state text NOT NULL,
    seq int NOT NULL,
    token uuid NOT NULL,
    attempt int NOT NULL,
    pid int NOT NULL,
    detail jsonb,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

#: Every state and branch: five attempts, short backoff (faults eat attempts too).
RETRY = Retry(max_attempts=5, backoff=0.05, max_delay=0.2, jitter=0)
#: The flaky state fails at random on these first attempts only.
FLAKY_ATTEMPTS = 2


def create_effects_table(conn: Any) -> None:
    conn.execute(EFFECTS_DDL)


class Chaos(BaseModel):
    pause: float = 0.05  # every state and branch sleeps this long
    slow: float = 1.5  # seconds the slow state sleeps (every attempt)
    p: float = 0.3  # probability of a transient error in the flaky state
    width: int = 3  # branches of the fan-out
    trail: list[str] = []


def _record(ctx: Any, detail: Any = None) -> None:
    row = (ctx.run_id, ctx.state, ctx.step_seq, ctx.fencing_token, ctx.attempt, os.getpid())

    def write(conn: Any) -> None:
        conn.execute(
            "INSERT INTO chaos_effects (run_id, state, seq, token, attempt, pid, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (*row, None if detail is None else Jsonb(detail)),
        )

    ctx.in_commit(write)


def _step(ctx: Any, target: str | None = None) -> Any:
    """The body shared by the plain states: pause, record, move on (or complete)."""
    time.sleep(ctx.data.pause)
    ctx.data.trail.append(ctx.state)
    _record(ctx)
    if target is None:
        return Complete(output={"trail": ctx.data.trail})
    return target


def chance(run_id: str, attempt: int) -> float:
    """A number in [0, 1) fixed by the run and the attempt."""
    digest = hashlib.sha256(f"{run_id}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# -- linear --------------------------------------------------------------------------------

linear = Workflow("chaos_linear", context=Chaos)


@linear.state(initial=True, to=["b"], retry=RETRY)
def a(ctx: Any) -> Any:
    return _step(ctx, "b")


@linear.state(to=["c"], retry=RETRY)
def b(ctx: Any) -> Any:
    return _step(ctx, "c")


@linear.state(to=["d"], retry=RETRY)
def c(ctx: Any) -> Any:
    return _step(ctx, "d")


@linear.state(retry=RETRY)
def d(ctx: Any) -> Any:
    return _step(ctx)


# -- slow ----------------------------------------------------------------------------------

slow = Workflow("chaos_slow", context=Chaos)


@slow.state(initial=True, to=["slow"], retry=RETRY, name="enter")
def slow_enter(ctx: Any) -> Any:
    return _step(ctx, "slow")


@slow.state(to=["leave"], retry=RETRY, name="slow")
def slow_slow(ctx: Any) -> Any:
    time.sleep(ctx.data.slow)  # never checks ctx.lease_lost(): a zombie tries to commit
    return _step(ctx, "leave")


@slow.state(retry=RETRY, name="leave")
def slow_leave(ctx: Any) -> Any:
    return _step(ctx)


# -- flaky ---------------------------------------------------------------------------------

flaky = Workflow("chaos_flaky", context=Chaos)


@flaky.state(initial=True, to=["flaky"], retry=RETRY, name="enter")
def flaky_enter(ctx: Any) -> Any:
    return _step(ctx, "flaky")


@flaky.state(to=["leave"], retry=RETRY, name="flaky")
def flaky_flaky(ctx: Any) -> Any:
    if ctx.attempt <= FLAKY_ATTEMPTS and chance(ctx.run_id, ctx.attempt) < ctx.data.p:
        raise ConnectionError(f"transient failure on attempt {ctx.attempt}")
    return _step(ctx, "leave")


@flaky.state(retry=RETRY, name="leave")
def flaky_leave(ctx: Any) -> Any:
    return _step(ctx)


# -- fan-out -------------------------------------------------------------------------------

fan = Workflow("chaos_fan", context=Chaos)


@fan.state(initial=True, to=["gather"], retry=RETRY)
def fork(ctx: Any) -> Parallel:
    time.sleep(ctx.data.pause)
    _record(ctx)
    return Parallel(branches=["leg"] * ctx.data.width, join="gather")


@fan.state(branch=True, retry=RETRY)
def leg(ctx: Any) -> Any:
    time.sleep(ctx.data.pause)
    return {"index": ctx.index}


@fan.state(to=["leave"], retry=RETRY)
def gather(ctx: Any) -> Any:
    time.sleep(ctx.data.pause)
    ctx.data.trail.append("gather")
    _record(ctx, {"results": ctx.branch_results, "errors": ctx.branch_errors})
    return "leave"


@fan.state(retry=RETRY, name="leave")
def fan_leave(ctx: Any) -> Any:
    return _step(ctx)


WORKFLOWS = (linear, slow, flaky, fan)
#: The submitted mix, in rotation: the slow and fan-out runs keep leases in flight.
MIX = (linear, slow, flaky, fan, slow)


# -- a branch that records its effect (not in the mix: see test_engine_gaps.py) ------------

marked = Workflow("chaos_branch_effect", context=Chaos)


@marked.state(initial=True, to=["tally"], retry=RETRY)
def spread(ctx: Any) -> Parallel:
    return Parallel(branches=["mark"] * ctx.data.width, join="tally")


@marked.state(branch=True, retry=RETRY)
def mark(ctx: Any) -> Any:
    _record(ctx, {"index": ctx.index})  # ctx.in_commit in a branch
    return ctx.index


@marked.state(retry=RETRY)
def tally(ctx: Any) -> Complete:
    return Complete(output={"results": ctx.branch_results})
