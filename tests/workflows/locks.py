"""Workflows whose states hold resource locks and write an enter/exit ledger, so a
test can check that no two holders of one key ever overlapped."""

from __future__ import annotations

import os
import time
from typing import Any

import psycopg
from pydantic import BaseModel

from leaseflow import Complete, Workflow

LEDGER = """
CREATE TABLE IF NOT EXISTS lock_ledger (
    id bigserial PRIMARY KEY, key text, fence bigint, holder text, event text,
    at timestamptz DEFAULT clock_timestamp()
)
"""


class Res(BaseModel):
    key: str
    hold: float = 0.02


def write(key: str, fence: int | None, holder: str, event: str) -> None:
    """One ledger row, committed at once (the state's own write, not its commit's)."""
    url = os.environ["LEASEFLOW_DATABASE_URL"].replace("+psycopg", "")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO lock_ledger (key, fence, holder, event) VALUES (%s, %s, %s, %s)",
            (key, fence, holder, event),
        )


def guarded(ctx: Any) -> None:
    write(ctx.data.key, ctx.lock_token, f"run {ctx.run_id}", "enter")
    time.sleep(ctx.data.hold)
    write(ctx.data.key, ctx.lock_token, f"run {ctx.run_id}", "exit")


def declare(name: str) -> Workflow:
    wf = Workflow(name, context=Res)

    @wf.state(initial=True, to=["finish"], lock="res:{key}")
    def critical(ctx: Any) -> str:
        guarded(ctx)
        return "finish"

    @wf.state()
    def finish(ctx: Any) -> Complete:
        return Complete()

    return wf


lock_a = declare("lock_a")
lock_b = declare("lock_b")
