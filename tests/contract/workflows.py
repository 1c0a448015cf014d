"""Small workflows for the store contract, and the decision values a runner would
commit for them (built directly: the store only writes them)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Parallel, Retry, Workflow
from leaseflow.fsm import checkpoint
from leaseflow.fsm.rules import BranchDecision, Fork, Transition
from leaseflow.fsm.waits import WaitPlan
from leaseflow.store.records import LockWant
from leaseflow.types import StepOutcome

TTL = 10.0  # seconds of every lease the tests take
DISPATCH_TIMEOUT = 30.0  # the stores' dispatch timeout
CHECKPOINT = checkpoint.encode({"n": 0}, limit=1_000_000)
#: What the tests' ``in_commit`` callbacks write: a note about a run, in the app's table.
NOTE_SQL = "INSERT INTO contract_notes (run_id, note) VALUES (%s, %s)"


class Counter(BaseModel):
    n: int = 0


#: first -> second -> third; first may be attempted twice (the reaper's budget).
linear = Workflow("contract_linear", context=Counter, register=False)


@linear.state(initial=True, to=["second"], retry=Retry(max_attempts=2))
def first(ctx: Any) -> str:
    return "second"


@linear.state(to=["third"], inline=True)
def second(ctx: Any) -> str:
    return "third"


@linear.state()
def third(ctx: Any) -> Complete:
    return Complete(output={"n": ctx.data.n})


#: spread forks legs (Parallel) or squares (Map), joined in gathered.
fan = Workflow("contract_fan", context=Counter, register=False)


@fan.state(initial=True, to=["gathered"])
def spread(ctx: Any) -> Parallel:
    return Parallel(branches=["leg", "leg"], join="gathered")


@fan.state(branch=True, retry=Retry(max_attempts=2))
def leg(ctx: Any) -> int:
    return int(ctx.index)


@fan.state(branch=True)
def square(ctx: Any) -> int:
    return int(ctx.item) ** 2


@fan.state()
def gathered(ctx: Any) -> Complete:
    return Complete(output=ctx.branch_results)


# -- decisions -----------------------------------------------------------------------


def move(to: str, *, max_attempts: int = 1) -> Transition:
    return Transition(
        outcome=StepOutcome.NEXT,
        status="pending",
        next_state=to,
        attempt=0,
        max_attempts=max_attempts,
        checkpoint=checkpoint.encode({"n": 1}, limit=1_000_000),
    )


def complete(output: Any) -> Transition:
    return Transition(outcome=StepOutcome.COMPLETED, status="completed", output=output)


def retry(attempt: int, max_attempts: int, delay: float) -> Transition:
    return Transition(
        outcome=StepOutcome.RETRY,
        status="pending",
        attempt=attempt,
        max_attempts=max_attempts,
        delay=delay,
        step_error="Traceback: boom",
        accepted=False,
    )


def fork(
    states: tuple[str, ...] = ("leg", "leg"),
    *,
    items: tuple[Any, ...] | None = None,
    policy: str = "fail_fast",
    window: int | None = None,
) -> Transition:
    """spread's fork to gathered: a Parallel of ``states``, or a Map over ``items``."""
    attempts = tuple(fan.states[s].retry.max_attempts for s in states)
    return Transition(
        outcome=StepOutcome.FORK,
        status="waiting",
        max_attempts=1,
        fork=Fork(
            kind="parallel" if items is None else "map",
            join_state="gathered",
            states=states,
            max_attempts=attempts,
            items=items,
            on_branch_error=policy,
            max_concurrency=window,
            checkpoint=CHECKPOINT,
            context_version=1,
            join_max_attempts=fan.states["gathered"].retry.max_attempts,
        ),
    )


def done(result: Any) -> BranchDecision:
    return BranchDecision("completed", result=result)


def broken(error: str = "ValueError: broken") -> BranchDecision:
    return BranchDecision("failed", error=error, accepted=False)


#: ask waits for "approval" (-> yes) or times out (-> late); "no" is the other route.
waiter = Workflow("contract_waiter", context=Counter, register=False, run_timeout=600)


@waiter.state(initial=True, to=["yes", "no", "late"])
def ask(ctx: Any) -> str:
    return "yes"


@waiter.state(to=["ask"])
def yes(ctx: Any) -> str:
    return "ask"


@waiter.state()
def no(ctx: Any) -> Complete:
    return Complete(output="no")


@waiter.state()
def late(ctx: Any) -> Complete:
    return Complete(output="late")


def park(
    event: str | None = "approval",
    *,
    timeout: float | None = None,
    on_timeout: str | None = None,
    next: str = "yes",
) -> Transition:
    """ask's Wait: for ``event`` (None: a timer) to ``next``."""
    plan = WaitPlan(next=next, next_attempts=1, event=event, timeout=timeout, on_timeout=on_timeout)
    return Transition(
        outcome=StepOutcome.WAIT, status="waiting", attempt=0, max_attempts=1, wait=plan
    )


class Tenant(BaseModel):
    tenant: str = "acme"


#: take (locks "db:{tenant}" until use's commit) -> use -> done
locked = Workflow("contract_locked", context=Tenant, register=False)


@locked.state(initial=True, to=["use"], lock="db:{tenant}", hold_lock_until="use", name="take")
def _take(ctx: Any) -> str:
    return "use"


@locked.state(to=["done"], name="use")
def _use(ctx: Any) -> str:
    return "done"


@locked.state(name="done")
def _done(ctx: Any) -> Complete:
    return Complete()


def lock_of(key: str = "db:acme", until: str | None = None) -> Any:
    """A ``key_of`` that asks every claimed state for ``key`` (until ``until``)."""
    return lambda claim: LockWant(key, until)
