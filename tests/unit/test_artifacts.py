"""``ctx.artifacts`` through the runner on the in-memory engine: the context holds only
a reference; an attempt that raises leaves no artefact behind; a later state reads it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Retry, Workflow
from leaseflow.testing import engine

PAGE = "<html>" + "<p>the same paragraph, again and again</p>" * 500 + "</html>"


class Research(BaseModel):
    page: str = ""  # a reference, never the page itself
    words: int = 0
    tries: int = 0


def research() -> Workflow:
    wf = Workflow("t_artifacts", context=Research, register=False)

    @wf.state(initial=True, to=["summarise"], retry=Retry(max_attempts=2, backoff=0, jitter=0))
    def fetch(ctx: Any) -> str:
        ctx.data.page = ctx.artifacts.put("page.html", PAGE, content_type="text/html")
        if ctx.attempt == 1:
            ctx.artifacts.put("first-attempt-only", "lost with the attempt")
            raise ConnectionError("flaky network")  # retried: its puts are not written
        return "summarise"

    @wf.state()
    def summarise(ctx: Any) -> Complete:
        page = ctx.artifacts.get_text(ctx.data.page)
        return Complete(output={"chars": len(page), "ref": ctx.data.page})

    return wf


def test_a_state_puts_an_artifact_and_a_later_state_reads_it_by_reference():
    with engine() as eng:
        run = eng.run_until_done(eng.start(research(), {}))
        assert run.status == "completed", run.error
        assert run.output["chars"] == len(PAGE)
        assert run.output["ref"].startswith("artifact:page.html@")
        assert [a.name for a in run.artifacts] == ["page.html"]  # not the failed attempt's
        stored = eng.artifact(run.id, "page.html")
        assert (stored.text, stored.content_type, stored.state) == (PAGE, "text/html", "fetch")
        assert stored.stored_bytes < len(PAGE) / 50
        # the checkpoint holds the reference only
        assert all((s.context_bytes or 0) < 200 for s in run.steps)
