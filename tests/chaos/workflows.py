"""The chaos mix: five small workflows whose every state records its effect.

- ``chaos_linear``: a -> b -> c -> d, quick states.
- ``chaos_slow``: enter -> slow -> leave; ``slow`` sleeps ``ctx.data.slow`` seconds
  (the state a fault hits in the middle: kill, SIGSTOP, clock jump).
- ``chaos_inline``: enter -> hop -> slow -> leave, every state after ``enter`` declared
  ``inline=True``: one task runs the chain (inline continuation), its ``slow`` state
  sleeping like ``chaos_slow``'s, so process faults hit inline chains too.
- ``chaos_flaky``: enter -> flaky -> leave; ``flaky`` raises a transient
  ``ConnectionError`` with probability ``ctx.data.p`` on its first two attempts (decided
  by a hash of run id and attempt, so a run's luck is reproducible), which leaves
  three of its five attempts to the faults.
- ``chaos_fan``: fork -> (``width`` x leg, a Parallel) -> gather -> leave.
- ``chaos_lock`` (not in the standard mix: the lock faults add it, :data:`LOCKED`):
  enter -> hold -> leave, ``hold`` declared ``lock="chaos:{key}"``: it writes an
  ``enter`` row to ``chaos_lock_ledger`` (its own connection, committed at once, with
  ``ctx.lock_token``), sleeps ``ctx.data.slow``, writes ``exit``, and records its
  effect (key and fence) in its commit; the ledger is invariant I6's evidence.
- ``chaos_wait`` (not in the standard mix: the wait faults submit it): enter -> park,
  which returns ``Wait(event="go", next="done", timeout=wait_s, on_timeout="late")``
  (``timer``: a durable timer ``Wait(next="done", timeout=wait_s)``); ``done`` records
  the signal it was resumed with, ``late`` that the wait ran out.

A run's input can steer one state into misbehaving (:data:`SABOTAGE`, for F-14,
F-17 and F-18): raise a transient or a permanent error, or put a value that is not
JSON, or too large, in its output or context. A :class:`Job` pairs a workflow and
such an input with the error code the run must then fail with.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from pydantic import BaseModel

from leaseflow import Complete, Parallel, Retry, Wait, Workflow, errors

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

#: Errors worth retrying: a transient failure, or the database dropping an
#: ``in_commit`` write (F-7, F-9). Anything else (a ``ValueError``) fails the run at once.
TRANSIENT = (ConnectionError, psycopg.Error)
#: Every state and branch: five attempts, short backoff (faults eat attempts too).
RETRY = Retry(max_attempts=5, backoff=0.05, max_delay=0.2, jitter=0, retry_on=TRANSIENT)
#: The flaky state fails at random on these first attempts only; a state steered to
#: ``transient`` fails on exactly these.
FLAKY_ATTEMPTS = 2
#: Over ``LEASEFLOW_MAX_CHECKPOINT_BYTES`` (1 MiB by default).
HUGE = 3 << 20
#: What a steered state puts in its output (``output:<kind>``) or context
#: (``context:<kind>``).
BAD_VALUES: dict[str, Callable[[], Any]] = {
    "set": lambda: {1, 2},
    "nan": lambda: float("nan"),
    "datetime": lambda: datetime.now(UTC),
    "object": object,
    "huge": lambda: "x" * HUGE,
}
#: The sabotage a run's input may ask of one state (``sabotage_at``): ``transient``
#: (``ConnectionError`` on the first two attempts), ``permanent`` (``ValueError``),
#: ``output:<kind>`` (a final state's output, a branch's result) or ``context:<kind>``
#: (of :data:`BAD_VALUES`).
SABOTAGE = (
    "transient",
    "permanent",
    *(f"{w}:{k}" for w in ("output", "context") for k in BAD_VALUES),
)


#: Who held which lock when, as the holders themselves saw it (invariant I6): a state
#: holding ``lock=`` (``holder`` = ``run <lease token>``) or code holding a lock
#: (``code <lock token>``) writes ``enter`` and ``exit`` rows, each committed at once.
LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS chaos_lock_ledger (
    id bigserial PRIMARY KEY,
    key text NOT NULL,
    fence bigint NOT NULL,
    holder text NOT NULL,
    run_id uuid,
    event text NOT NULL CHECK (event IN ('enter', 'exit')),
    pid int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


#: The registry's refusal counts as the harness saw them before stopping the workers (a
#: worker process that stops cleanly leaves ``lf_workers``).
WORKERS_SEEN_DDL = """
CREATE TABLE IF NOT EXISTS chaos_workers_seen (id text NOT NULL, leases_lost int NOT NULL)
"""


def create_effects_table(conn: Any) -> None:
    conn.execute(EFFECTS_DDL)
    conn.execute(LEDGER_DDL)
    conn.execute(WORKERS_SEEN_DDL)


class Chaos(BaseModel):
    pause: float = 0.05  # every state and branch sleeps this long
    slow: float = 1.5  # seconds the slow state sleeps (every attempt)
    p: float = 0.3  # probability of a transient error in the flaky state
    width: int = 3  # branches of the fan-out
    trail: list[str] = []
    sabotage_at: str | None = None  # the state that misbehaves (None: none)
    sabotage: str = ""  # how: one of SABOTAGE
    extra: Any = None  # where context sabotage puts its value
    wait_s: float | None = None  # chaos_wait: the wait's timeout (None: none)
    key: str = "k0"  # chaos_lock: the lock its hold state takes (chaos:<key>)
    timer: bool = False  # chaos_wait: a durable timer instead of a wait for WAIT_EVENT


def _record(ctx: Any, detail: Any = None) -> None:
    row = (ctx.run_id, ctx.state, ctx.step_seq, ctx.fencing_token, ctx.attempt, os.getpid())

    def write(conn: Any) -> None:
        conn.execute(
            "INSERT INTO chaos_effects (run_id, state, seq, token, attempt, pid, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (*row, None if detail is None else Jsonb(detail)),
        )

    ctx.in_commit(write)


def _sabotage(ctx: Any) -> Any:
    """Misbehave as the input asks, if this is the state: raise, or return the bad
    value meant for the output (``None`` otherwise)."""
    if ctx.state != ctx.data.sabotage_at:
        return None
    how, _, kind = ctx.data.sabotage.partition(":")
    if how == "transient" and ctx.attempt <= FLAKY_ATTEMPTS:
        raise ConnectionError(f"steered transient failure on attempt {ctx.attempt}")
    if how == "permanent":
        raise ValueError(f"steered permanent failure in {ctx.state}")
    if how == "context":
        ctx.data.extra = BAD_VALUES[kind]()
    if how == "output":
        return BAD_VALUES[kind]()
    return None


def _step(ctx: Any, target: str | None = None) -> Any:
    """The body shared by the plain states: pause, record, move on (or complete)."""
    time.sleep(ctx.data.pause)
    bad = _sabotage(ctx)
    ctx.data.trail.append(ctx.state)
    _record(ctx)
    if target is None:
        output: dict[str, Any] = {"trail": ctx.data.trail}
        if bad is not None:
            output["bad"] = bad
        return Complete(output=output)
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


# -- inline chain --------------------------------------------------------------------------

inline = Workflow("chaos_inline", context=Chaos)


@inline.state(initial=True, to=["hop"], retry=RETRY, name="enter")
def inline_enter(ctx: Any) -> Any:
    return _step(ctx, "hop")


@inline.state(to=["slow"], retry=RETRY, inline=True)
def hop(ctx: Any) -> Any:
    return _step(ctx, "slow")


@inline.state(to=["leave"], retry=RETRY, inline=True, name="slow")
def inline_slow(ctx: Any) -> Any:
    time.sleep(ctx.data.slow)  # as chaos_slow's: a zombie tries to commit
    return _step(ctx, "leave")


@inline.state(retry=RETRY, inline=True, name="leave")
def inline_leave(ctx: Any) -> Any:
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
    result = {"index": ctx.index}
    bad = _sabotage(ctx)  # output sabotage: the branch's result
    if bad is not None:
        result["bad"] = bad
    return result


@fan.state(to=["leave"], retry=RETRY)
def gather(ctx: Any) -> Any:
    time.sleep(ctx.data.pause)
    ctx.data.trail.append("gather")
    _record(ctx, {"results": ctx.branch_results, "errors": ctx.branch_errors})
    return "leave"


@fan.state(retry=RETRY, name="leave")
def fan_leave(ctx: Any) -> Any:
    return _step(ctx)


# -- wait ----------------------------------------------------------------------------------

#: The event ``chaos_wait`` waits for.
WAIT_EVENT = "go"

waiter = Workflow("chaos_wait", context=Chaos)


@waiter.state(initial=True, to=["park"], retry=RETRY, name="enter")
def wait_enter(ctx: Any) -> Any:
    return _step(ctx, "park")


@waiter.state(to=["done", "late"], retry=RETRY)
def park(ctx: Any) -> Wait:
    time.sleep(ctx.data.pause)
    ctx.data.trail.append("park")
    _record(ctx)  # commits with the Wait
    if ctx.data.timer:
        return Wait(next="done", timeout=ctx.data.wait_s)
    return Wait(event=WAIT_EVENT, next="done", timeout=ctx.data.wait_s, on_timeout="late")


@waiter.state(retry=RETRY)
def done(ctx: Any) -> Complete:
    time.sleep(ctx.data.pause)
    ctx.data.trail.append("done")
    _record(ctx, {"signal": ctx.signal})
    return Complete(output={"trail": ctx.data.trail, "via": "done", "signal": ctx.signal})


@waiter.state(retry=RETRY)
def late(ctx: Any) -> Complete:
    time.sleep(ctx.data.pause)
    ctx.data.trail.append("late")
    _record(ctx, {"signal": ctx.signal})
    return Complete(output={"trail": ctx.data.trail, "via": "late", "signal": ctx.signal})


# -- lock ----------------------------------------------------------------------------------

#: The prefix of the lock keys of ``chaos_lock`` (``chaos:<key>``).
LOCK_PREFIX = "chaos:"
#: The ledger's database (the workers' ``LEASEFLOW_DATABASE_URL`` when None).
LEDGER_URL: str | None = None
_ledger: dict[int, Any] = {}  # pid -> its autocommit connection


def ledger_write(key: str, fence: int, holder: str, event: str, run_id: str | None = None) -> None:
    """One ``chaos_lock_ledger`` row, committed at once (not with the state's commit: a
    holder whose commit is refused has entered all the same)."""
    conn = _ledger.get(os.getpid())
    if conn is None or conn.closed:
        url = LEDGER_URL or os.environ["LEASEFLOW_DATABASE_URL"]
        conn = psycopg.connect(url.replace("+psycopg", ""), autocommit=True)
        _ledger[os.getpid()] = conn
    row = (key, fence, holder, run_id, event, os.getpid())
    sql = (
        "INSERT INTO chaos_lock_ledger (key, fence, holder, run_id, event, pid) "
        "VALUES (%s, %s, %s, %s, %s, %s)"
    )
    try:
        conn.execute(sql, row)
    except psycopg.OperationalError:  # a dropped connection: once more on a fresh one
        _ledger.pop(os.getpid(), None)
        url = LEDGER_URL or os.environ["LEASEFLOW_DATABASE_URL"]
        conn = psycopg.connect(url.replace("+psycopg", ""), autocommit=True)
        _ledger[os.getpid()] = conn
        conn.execute(sql, row)


locked = Workflow("chaos_lock", context=Chaos)


@locked.state(initial=True, to=["hold"], retry=RETRY, name="enter")
def lock_enter(ctx: Any) -> Any:
    return _step(ctx, "hold")


@locked.state(to=["leave"], retry=RETRY, lock=LOCK_PREFIX + "{key}", name="hold")
def lock_hold(ctx: Any) -> Any:
    key, fence = LOCK_PREFIX + ctx.data.key, ctx.lock_token
    holder = f"run {ctx.fencing_token}"
    ledger_write(key, fence, holder, "enter", ctx.run_id)
    try:
        time.sleep(ctx.data.slow)  # never checks ctx.lease_lost(): a zombie tries to commit
    finally:
        ledger_write(key, fence, holder, "exit", ctx.run_id)
    time.sleep(ctx.data.pause)
    ctx.data.trail.append("hold")
    _record(ctx, {"key": key, "fence": fence})
    return "leave"


@locked.state(retry=RETRY, name="leave")
def lock_leave(ctx: Any) -> Any:
    return _step(ctx)


WORKFLOWS = (linear, slow, flaky, fan, inline, waiter, locked)
#: The submitted mix, in rotation: the slow, inline and fan-out runs keep leases in flight.
MIX = (linear, slow, flaky, fan, inline)


@dataclass(frozen=True)
class Job:
    """One kind of run: a workflow, its input, and the error code it must fail with
    (``None``: it must complete)."""

    wf: Workflow
    input: dict[str, Any] = field(default_factory=dict)
    expect: str | None = None


def steered(wf: Workflow, at: str, how: str, expect: str | None = None, **data: Any) -> Job:
    """A run of ``wf`` whose state ``at`` misbehaves as ``how`` (one of :data:`SABOTAGE`);
    ``data``: more of its input."""
    if how not in SABOTAGE:
        raise ValueError(f"sabotage {how!r}: one of {SABOTAGE}")
    return Job(wf, {"sabotage_at": at, "sabotage": how, **data}, expect)


#: A fan-out whose one branch fails: with more, two failing at once can deadlock the
#: engine (test_engine_gaps.py::test_a_failing_branch_and_a_committing_one_do_not_deadlock).
ONE_LEG = {"width": 1}


#: F-14: transient errors are retried to success; a permanent one fails the run at once.
RAISING = (
    steered(linear, "c", "transient"),
    steered(inline, "hop", "transient"),  # the retry leaves the chain, then rejoins it
    steered(linear, "b", "permanent", errors.STATE_ERROR),
    steered(inline, "slow", "permanent", errors.STATE_ERROR),  # in an inlined state
    steered(fan, "leg", "transient"),  # every branch retried twice
    steered(fan, "leg", "permanent", errors.BRANCH_FAILED, **ONE_LEG),
)
#: The lock faults: runs of ``chaos_lock`` over three keys; ``k0``'s holders hold it for a
#: slow state's time (a fault strikes them mid-state), the others briefly, so that a
#: worker is seldom busy with them for long.
LOCKED = (
    Job(locked, {"key": "k0"}),
    Job(locked, {"key": "k1", "slow": 0.3}),
    Job(locked, {"key": "k2", "slow": 0.3}),
    Job(locked, {"key": "k1", "slow": 0.3}),
    Job(locked, {"key": "k2", "slow": 0.3}),
)
#: How long a long state (F-30, F-31) runs: longer than the shutdown grace.
LONG_S = 3.0
#: F-30 and F-31: ``chaos_slow`` runs whose slow state lasts ``LONG_S``.
LONG = (Job(slow, {"slow": LONG_S}),)
#: F-17: outputs and contexts that are not JSON.
NOT_JSON = (
    steered(inline, "leave", "output:set", errors.STATE_ERROR),
    steered(linear, "d", "output:nan", errors.STATE_ERROR),
    steered(slow, "leave", "output:datetime", errors.STATE_ERROR),
    steered(inline, "hop", "context:object", errors.CONTEXT_INVALID),
    steered(fan, "leg", "output:set", errors.BRANCH_FAILED, **ONE_LEG),  # a branch result
)
#: F-18: an output and a context over the size limit.
OVERSIZED = (
    steered(inline, "leave", "output:huge", errors.PAYLOAD_TOO_LARGE),
    steered(linear, "b", "context:huge", errors.PAYLOAD_TOO_LARGE),
    steered(inline, "hop", "context:huge", errors.PAYLOAD_TOO_LARGE),
    steered(fan, "leg", "output:huge", errors.BRANCH_FAILED, **ONE_LEG),  # a branch result
)
#: F-15: a few sentences in a run's context (``extra``, untouched unless sabotaged) make
#: its JSON longer than ``compress_min_bytes`` (256): its checkpoints are stored
#: zstd-compressed (codec 3), where the plain mix's are raw (codec 2).
WORDS = (
    "The operator asked for a summary of last night's deploy. Three services were "
    "rolled out in order: the billing API, the invoice renderer and the mail relay. "
    "The renderer's health check failed twice before it passed, so the rollout paused "
    "for four minutes; nothing was rolled back. Open questions: why the check timed "
    "out, and whether the relay's queue drained before the cutover. Next step: read "
    "the renderer's logs around 02:14 and compare them with the previous release."
)
#: F-15: runs that must complete, with contexts stored zstd-compressed (a plain chain
#: and a fan-out, whose group keeps the context too).
WORDY = (Job(linear, {"extra": WORDS}), Job(fan, {"extra": WORDS}))


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


# -- one branch fails while another commits (not in the mix: see test_engine_gaps.py) ------

split = Workflow("chaos_split_fate", context=Chaos)
#: Called inside the transaction of ``keep``'s commit: a test holds that transaction open.
IN_KEEP_COMMIT: list[Callable[[], None]] = []


@split.state(initial=True, to=["settle"], retry=RETRY)
def part(ctx: Any) -> Parallel:
    return Parallel(branches=["keep", "drop"], join="settle")


@split.state(branch=True, retry=RETRY)
def keep(ctx: Any) -> Any:
    def hold(conn: Any) -> None:
        for hook in IN_KEEP_COMMIT:
            hook()

    ctx.in_commit(hold)
    return ctx.index


@split.state(branch=True, retry=RETRY)
def drop(ctx: Any) -> Any:
    return {"bad": {1}}  # not JSON: the branch fails, and fail_fast fails the run


@split.state(retry=RETRY)
def settle(ctx: Any) -> Complete:
    return Complete(output={"results": ctx.branch_results})
