"""A workflow that returns what it is told to: an output, a branch result, or a Wait,
each as large as the input asks (the payload limit tests)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Parallel, Wait, Workflow


class Ask(BaseModel):
    make: str = "output"  # output | branch | wait
    size: int = 0
    note: str = ""


limits = Workflow("payload_limits", context=Ask)


@limits.state(initial=True, to=["joined", "parked"])
def start(ctx: Any) -> Any:
    if ctx.data.make == "branch":
        return Parallel(branches=["produce"], join="joined")
    if ctx.data.make == "wait":
        return Wait(event="go", next="parked")
    return Complete(output={"text": "x" * ctx.data.size})


@limits.state(branch=True)
def produce(ctx: Any) -> dict[str, str]:
    return {"text": "y" * ctx.data.size}


@limits.state()
def joined(ctx: Any) -> Complete:
    return Complete(output=ctx.branch_results)


@limits.state()
def parked(ctx: Any) -> Complete:
    return Complete(output=ctx.signal)
