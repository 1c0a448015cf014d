"""Fan-out workflows: Parallel and Map, steered by the run input."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Map, Parallel, Retry, Workflow


class Fan(BaseModel):
    width: int = 3
    items: list[int] = []
    max_concurrency: int | None = None
    policy: str = "fail_fast"
    fail_index: int | None = None  # this branch raises for good
    flaky_index: int | None = None  # this branch fails its first attempt
    sleep: float = 0.0  # each branch sleeps this long
    slow_index: int | None = None  # only this branch sleeps (on its first attempt)
    label: str = "ctx"


def _branch_body(ctx: Any, value: Any) -> Any:
    data = ctx.data
    if data.slow_index is None or (data.slow_index == ctx.index and ctx.attempt == 1):
        time.sleep(data.sleep)
    if data.fail_index == ctx.index:
        raise ValueError(f"branch {ctx.index} is broken")
    if data.flaky_index == ctx.index and ctx.attempt == 1:
        raise ConnectionError(f"branch {ctx.index} flaked")
    return value


parallel = Workflow("fan_parallel", context=Fan)


@parallel.state(initial=True, to=["joined"])
def fork(ctx: Any) -> Parallel:
    return Parallel(
        branches=["leg"] * ctx.data.width, join="joined", on_branch_error=ctx.data.policy
    )


@parallel.state(branch=True, retry=Retry(max_attempts=2, backoff=0.05, jitter=0))
def leg(ctx: Any) -> Any:
    return _branch_body(ctx, {"index": ctx.index, "label": ctx.data.label})


@parallel.state()
def joined(ctx: Any) -> Complete:
    return Complete(output={"results": ctx.branch_results, "errors": ctx.branch_errors})


mapped = Workflow("fan_map", context=Fan)


@mapped.state(initial=True, to=["summed"])
def spread(ctx: Any) -> Map:
    return Map(
        items=ctx.data.items,
        branch="square",
        join="summed",
        max_concurrency=ctx.data.max_concurrency,
        on_branch_error=ctx.data.policy,
    )


@mapped.state(branch=True, retry=Retry(max_attempts=2, backoff=0.05, jitter=0))
def square(ctx: Any) -> Any:
    return _branch_body(ctx, ctx.item * ctx.item)


@mapped.state()
def summed(ctx: Any) -> Complete:
    return Complete(output={"squares": ctx.branch_results, "errors": ctx.branch_errors})
