"""Benchmark workflows for leaseflow (``LEASEFLOW_WORKFLOWS=benchmarks.workflows``).

``fan_bench``: ``start`` forks a ``Parallel`` of ``width`` no-op ``leg`` branches,
each returning a small JSON value; ``join`` completes the run with a summary.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Parallel, Workflow


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
