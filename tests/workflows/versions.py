"""Two versions of one workflow, each with its own queue: a run keeps its version."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Wait, Workflow

QUEUES = {1: "lf-test-version-1", 2: "lf-test-version-2"}


class Data(BaseModel):
    seen: list[int] = []


def declare(version: int) -> Workflow:
    wf = Workflow("versioned", context=Data, version=version)
    queue = QUEUES[version]

    @wf.state(initial=True, to=["hold"], queue=queue)
    def begin(ctx: Any) -> str:
        ctx.data.seen.append(version)
        return "hold"

    @wf.state(to=["finish"], queue=queue)
    def hold(ctx: Any) -> Wait:
        return Wait(event="go", next="finish")

    @wf.state(queue=queue)
    def finish(ctx: Any) -> Complete:
        ctx.data.seen.append(version)
        return Complete(output={"version": version, "seen": ctx.data.seen})

    return wf


v1 = declare(1)
v2 = declare(2)
