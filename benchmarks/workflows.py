"""Benchmark workflows for leaseflow (``LEASEFLOW_WORKFLOWS=benchmarks.workflows``).

``fan_bench``: ``start`` forks a ``Parallel`` of ``width`` no-op ``leg`` branches,
each returning a small JSON value; ``join`` completes the run with a summary.
``linear_bench`` (W1): five no-op states ``s1`` -> ... -> ``s5`` -> Complete;
``linear_inline_bench``: the same with s2..s5 ``inline=True`` (one task per run).
``linear_locked_bench``: the same with ``lock="bench:{key}"`` on every state.
``recovery_bench`` (W5): ``first`` -> ``slow`` (sleeps ``sleep`` s; 3 attempts) -> ``last``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Next, Parallel, Workflow
from leaseflow.fsm.retry import Retry


class FanBench(BaseModel):
    width: int = 10


fan_bench = Workflow("fan_bench", context=FanBench)


@fan_bench.state(initial=True, to=["join"])
def start(ctx: Any) -> Parallel:
    return Parallel(branches=["leg"] * ctx.data.width, join="join")


@fan_bench.state(branch=True)
def leg(ctx: Any) -> dict[str, int]:
    return {"i": ctx.index}


@fan_bench.state()
def join(ctx: Any) -> Complete:
    results = ctx.branch_results
    return Complete(output={"n": len(results), "missing": sum(r is None for r in results)})


# -- W1 linear: five no-op states ------------------------------------------------------


class LinearBench(BaseModel):
    pass


def _linear(name: str, *, inline: bool) -> Workflow:
    """``s1`` -> ``s2`` -> ... -> ``s5`` -> Complete; ``inline``: s2..s5 run inline."""
    wf = Workflow(name, context=LinearBench)

    def move(target: str) -> Callable[[Any], Next]:
        def state(ctx: Any) -> Next:
            return Next(target)

        return state

    for i in range(1, 5):
        wf.state(name=f"s{i}", initial=i == 1, to=[f"s{i + 1}"], inline=inline and i > 1)(
            move(f"s{i + 1}")
        )

    def s5(ctx: Any) -> Complete:
        return Complete()

    wf.state(name="s5", inline=inline)(s5)
    return wf


linear_bench = _linear("linear_bench", inline=False)
#: The same five states with ``inline=True``: one task per run (inline continuation).
linear_inline_bench = _linear("linear_inline_bench", inline=True)


class LockBench(BaseModel):
    key: str = "k"


def _linear_locked(name: str) -> Workflow:
    """``linear_bench`` with ``lock="bench:{key}"`` on every state: each claim takes the
    run's lock in its transaction, each commit frees it."""
    wf = Workflow(name, context=LockBench)

    def move(target: str) -> Callable[[Any], Next]:
        def state(ctx: Any) -> Next:
            return Next(target)

        return state

    for i in range(1, 5):
        wf.state(name=f"s{i}", initial=i == 1, to=[f"s{i + 1}"], lock="bench:{key}")(
            move(f"s{i + 1}")
        )

    def s5(ctx: Any) -> Complete:
        return Complete()

    wf.state(name="s5", lock="bench:{key}")(s5)
    return wf


#: W1 with a lock on every state (a key per run: uncontended; or shared: contended).
linear_locked_bench = _linear_locked("linear_locked_bench")


# -- W5 recovery: the middle state sleeps ----------------------------------------------


class RecoveryBench(BaseModel):
    sleep: float = 2.0


recovery_bench = Workflow("recovery_bench", context=RecoveryBench)


@recovery_bench.state(initial=True, to=["slow"])
def first(ctx: Any) -> Next:
    return Next("slow")


@recovery_bench.state(to=["last"], retry=Retry(max_attempts=3, backoff=0.0, jitter=0.0))
def slow(ctx: Any) -> Next:
    deadline = time.monotonic() + ctx.data.sleep
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return Next("last")


@recovery_bench.state()
def last(ctx: Any) -> Complete:
    return Complete()
