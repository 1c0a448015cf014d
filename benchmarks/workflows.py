"""Benchmark workflows for leaseflow (``LEASEFLOW_WORKFLOWS=benchmarks.workflows``).

``fan_bench``: ``start`` forks a ``Parallel`` of ``width`` no-op ``leg`` branches,
each returning a small JSON value; ``join`` completes the run with a summary.
``linear_bench`` (W1): five no-op states ``s1`` -> ... -> ``s5`` -> Complete.
``recovery_bench`` (W5): ``first`` -> ``slow`` (sleeps ``sleep`` s; 3 attempts) -> ``last``.
"""

from __future__ import annotations

import time
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


linear_bench = Workflow("linear_bench", context=LinearBench)


@linear_bench.state(initial=True, to=["s2"])
def s1(ctx: Any) -> Next:
    return Next("s2")


@linear_bench.state(to=["s3"])
def s2(ctx: Any) -> Next:
    return Next("s3")


@linear_bench.state(to=["s4"])
def s3(ctx: Any) -> Next:
    return Next("s4")


@linear_bench.state(to=["s5"])
def s4(ctx: Any) -> Next:
    return Next("s5")


@linear_bench.state()
def s5(ctx: Any) -> Complete:
    return Complete()


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
