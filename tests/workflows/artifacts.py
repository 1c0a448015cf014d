"""A workflow that keeps a large report as an artefact (the artefact CLI tests)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Workflow

REPORT = "line of a long report\n" * 2000
BINARY = bytes(range(256)) * 4


class Report(BaseModel):
    report: str = ""
    raw: str = ""


reports = Workflow("artifact_reports", context=Report)


@reports.state(initial=True, to=["publish"])
def write(ctx: Any) -> str:
    ctx.data.report = ctx.artifacts.put("report.txt", REPORT)
    ctx.data.raw = ctx.artifacts.put("raw.bin", BINARY, content_type="application/x-demo")
    return "publish"


@reports.state()
def publish(ctx: Any) -> Complete:
    return Complete(output={"lines": ctx.artifacts.get_text(ctx.data.report).count("\n")})
