"""An AI-agent operation, modelled on a real operation lifecycle.

    received → preprocessing → gather ⇉ (fetch_docs ∥ fetch_memory) ⇉ inferring
    inferring ⇄ tool_executing  (until the model needs no more tools)
    inferring → postprocessing → delivering → completed

Each state is one Celery task (``leaseflow.agent_op.<state>``) and commits its
context before the next one starts. ``delivering`` fails once with a transient
error and is retried. The sleeps stand in for real work (an LLM call, a tool);
``crash_pause_s`` makes the first attempt of ``inferring`` slow, so that
``leaseflow demo --crash`` can kill a worker in the middle of it.
"""

from __future__ import annotations

import os
import random
import time
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from leaseflow import Complete, Parallel, Retry, Workflow

if TYPE_CHECKING:
    from leaseflow import Context


class AgentOp(BaseModel):
    """The run's context: control-plane data only (large artefacts go by reference)."""

    prompt: str
    user: str = "demo"
    docs: list[str] = Field(default_factory=list)
    memory: list[str] = Field(default_factory=list)
    tool_calls: int = 0
    max_tool_calls: int = 2
    draft: str | None = None
    answer: str | None = None
    delivery_attempts: int = 0
    work_ms: int = 40
    crash_pause_s: float = 0.0


agent = Workflow("agent_op", context=AgentOp, version=1)


def _work(ctx_data: AgentOp, scale: float = 1.0) -> None:
    """Simulated latency of a real call."""
    time.sleep(ctx_data.work_ms / 1000 * scale * random.uniform(0.5, 1.5))


@agent.state(initial=True, to=["preprocessing"])
def received(ctx: Context[AgentOp]) -> str:
    ctx.data.prompt = ctx.data.prompt.strip()
    return "preprocessing"


@agent.state(to=["gather"])
def preprocessing(ctx: Context[AgentOp]) -> str:
    _work(ctx.data)
    if not ctx.data.prompt:
        ctx.data.prompt = "(empty prompt)"
    return "gather"


@agent.state(to=["inferring"], branches=["fetch_docs", "fetch_memory"])
def gather(ctx: Context[AgentOp]) -> Parallel:
    # Two lookups side by side (a Celery chord when a result backend is configured);
    # 'inferring' runs once, when both have committed their results.
    return Parallel(branches=["fetch_docs", "fetch_memory"], join="inferring")


@agent.state(branch=True, retry=Retry(max_attempts=3, backoff=0.2))
def fetch_docs(ctx: Context[AgentOp]) -> list[str]:
    _work(ctx.data)
    return [f"doc-{i}:{ctx.data.prompt[:12]}" for i in range(3)]


@agent.state(branch=True, retry=Retry(max_attempts=3, backoff=0.2))
def fetch_memory(ctx: Context[AgentOp]) -> list[str]:
    _work(ctx.data)
    return [f"{ctx.data.user} prefers short answers"]


#: The pool of the model calls: a queue of its own when set (the compose stack runs a
#: ``worker-gpu`` service for it), else the default queue.
INFER_QUEUE = os.environ.get("LEASEFLOW_EXAMPLE_INFER_QUEUE") or None


@agent.state(
    to=["tool_executing", "postprocessing"],
    retry=Retry(max_attempts=4, backoff=0.5),
    queue=INFER_QUEUE,
)
def inferring(ctx: Context[AgentOp]) -> str:
    if ctx.branch_results:  # entered from 'gather': the lookups' results, in order
        ctx.data.docs, ctx.data.memory = ctx.branch_results
    if ctx.attempt == 1 and ctx.data.tool_calls == 0 and ctx.data.crash_pause_s:
        time.sleep(ctx.data.crash_pause_s)  # a long model call: a good place to crash
    _work(ctx.data, scale=3)
    if ctx.data.tool_calls < ctx.data.max_tool_calls:
        return "tool_executing"
    ctx.data.draft = f"Answer to {ctx.data.prompt!r} using {len(ctx.data.docs)} docs"
    return "postprocessing"


@agent.state(to=["inferring"])
def tool_executing(ctx: Context[AgentOp]) -> str:
    _work(ctx.data)
    ctx.data.tool_calls += 1
    return "inferring"


@agent.state(to=["delivering"])
def postprocessing(ctx: Context[AgentOp]) -> str:
    _work(ctx.data)
    ctx.data.answer = (ctx.data.draft or "").upper()
    return "delivering"


class DeliveryTimeout(ConnectionError):
    """The webhook did not answer in time (transient)."""


@agent.state(to=["completed"], retry=Retry(max_attempts=3, backoff=0.05, jitter=0.2))
def delivering(ctx: Context[AgentOp]) -> str:
    _work(ctx.data)
    if ctx.attempt == 1:
        raise DeliveryTimeout("webhook timed out (the demo fails every first delivery)")
    ctx.data.delivery_attempts = ctx.attempt
    return "completed"


@agent.state(end="completed")
def completed(ctx: Context[AgentOp]) -> Complete:
    return Complete(
        output={
            "answer": ctx.data.answer,
            "tool_calls": ctx.data.tool_calls,
            "delivery_attempts": ctx.data.delivery_attempts,
        }
    )
