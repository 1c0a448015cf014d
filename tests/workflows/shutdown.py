"""A long state, for graceful shutdown and dead-worker tests: it runs until its marker
file exists (or a minute has passed)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Workflow


class Grind(BaseModel):
    marker: str


long_job = Workflow("long_job", context=Grind)


@long_job.state(initial=True, to=["finish"])
def grind(ctx: Any) -> str:
    deadline = time.monotonic() + 60
    while not Path(ctx.data.marker).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return "finish"


@long_job.state()
def finish(ctx: Any) -> Complete:
    return Complete(output={"attempt_of_grind": None})
