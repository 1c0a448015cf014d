"""A workflow whose middle state runs in another pool (queue ``lf-test-gpu``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Workflow

GPU = "lf-test-gpu"


class Doc(BaseModel):
    text: str = "x"


pooled = Workflow("pooled", context=Doc)


@pooled.state(initial=True, to=["infer"])
def prep(ctx: Any) -> str:
    return "infer"


@pooled.state(to=["post"], queue=GPU)
def infer(ctx: Any) -> str:
    return "post"


@pooled.state()
def post(ctx: Any) -> Complete:
    return Complete()
