"""What the pages show, shaped from the client's records: the runs list's filters and
counts, a run's step timeline, its visited path and graph. No HTTP here."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from markupsafe import Markup

from leaseflow import errors
from leaseflow.client import Client
from leaseflow.dashboard import graph_svg
from leaseflow.store.records import RunRecord
from leaseflow.types import TERMINAL_STATUSES, RunStatus

STATUSES = [s.value for s in RunStatus]
ACTIVE = [s.value for s in RunStatus if s not in TERMINAL_STATUSES]
#: Counts by status stop here ("1000+"): a page's refresh never scans every run.
COUNT_CAP = 1000
#: The newest id a keyset page can end at: ``(until, LAST_ID)`` bounds "created before".
LAST_ID = "ffffffff-ffff-ffff-ffff-ffffffffffff"


def parse_when(text: str | None) -> datetime | None:
    """A ``datetime-local`` value (UTC unless it names a zone); None when blank.
    ``ValueError`` when it is no date."""
    if not text:
        return None
    when = datetime.fromisoformat(text)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass
class Filters:
    """The runs list's query: status, workflow, tenant (admins), time range, page."""

    status: str | None = None
    workflow: str | None = None
    tenant: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 50
    problems: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, query: dict[str, str]) -> Filters:
        found = cls(workflow=query.get("workflow") or None, tenant=query.get("tenant") or None)
        status = query.get("status") or None
        if status is not None and status not in STATUSES:
            found.problems.append(f"unknown status {status!r}")
        else:
            found.status = status
        for name in ("since", "until"):
            try:
                setattr(found, name, parse_when(query.get(name)))
            except ValueError:
                found.problems.append(f"{name}: not a date and time ({query.get(name)!r})")
        try:
            found.limit = min(max(int(query.get("limit") or 50), 1), 500)
        except ValueError:
            found.problems.append("limit: not a number")
        return found

    def query(self, **changes: Any) -> dict[str, str]:
        """The non-empty filters as query parameters (for links and the live refresh)."""
        values = {
            "status": self.status,
            "workflow": self.workflow,
            "tenant": self.tenant,
            "since": self.since.strftime("%Y-%m-%dT%H:%M") if self.since else None,
            "until": self.until.strftime("%Y-%m-%dT%H:%M") if self.until else None,
        }
        values.update(changes)
        return {k: str(v) for k, v in values.items() if v not in (None, "")}


def runs_page(
    client: Client, filters: Filters, before: tuple[datetime, str] | None
) -> tuple[list[RunRecord], tuple[datetime, str] | None]:
    """A page of runs newest first within the time range, and the keyset of the next."""
    if before is None and filters.until is not None:
        before = (filters.until, LAST_ID)
    found = client.list_runs(
        filters.status, filters.workflow, filters.limit + 1, tenant=filters.tenant, before=before
    )
    if filters.since is not None:
        found = [run for run in found if run.created_at >= filters.since]
    page = found[: filters.limit]
    more = len(found) > filters.limit
    return page, ((page[-1].created_at, page[-1].id) if more else None)


def counts(client: Client, filters: Filters) -> dict[str, str]:
    """Runs by status under the workflow, tenant and time filters, "1000+" past the cap."""
    out: dict[str, str] = {}
    before = (filters.until, LAST_ID) if filters.until is not None else None
    for status in STATUSES:
        found = client.list_runs(
            status, filters.workflow, COUNT_CAP + 1, tenant=filters.tenant, before=before
        )
        if filters.since is not None:
            found = [run for run in found if run.created_at >= filters.since]
        out[status] = f"{COUNT_CAP}+" if len(found) > COUNT_CAP else str(len(found))
    return out


def duration(ms: float | None) -> str:
    """``850 ms``, ``2.4 s``, ``3 min 5 s``, ``2 h 4 min``; blank for None."""
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    return f"{minutes // 60} h {minutes % 60} min"


def when(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if at is not None else ""


def pretty(value: Any, limit: int = 4000) -> str:
    """JSON for a ``<pre>``, cut at ``limit`` characters."""
    text = json.dumps(value, indent=2, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "\n… (cut)"


def timeline(run: RunRecord) -> list[dict[str, Any]]:
    """The steps with a bar each: its offset and width as percentages of the run's span."""
    steps = run.steps
    if not steps:
        return []
    begin = min([run.created_at, *(s.started_at for s in steps if s.started_at is not None)])
    end = max([run.finished_at or run.updated_at, *(s.finished_at for s in steps)])
    span = max((end - begin).total_seconds(), 1e-3)
    rows = []
    for step in steps:
        start = step.started_at or step.finished_at
        left = (start - begin).total_seconds() / span * 100
        width = max((step.finished_at - start).total_seconds() / span * 100, 0.6)
        rows.append({"step": step, "left": f"{left:.2f}", "width": f"{min(width, 100):.2f}"})
    return rows


def forks_of(run: RunRecord) -> list[tuple[str, str, str]]:
    """The fork and join edges the run's Parallel/Map groups went along."""
    found: list[tuple[str, str, str]] = []
    for group in run.groups:
        fork = next((s.state for s in run.steps if s.seq == group.parent_seq), None)
        for branch in group.branches:
            if fork is not None:
                found.append((fork, branch.state, "fork"))
            found.append((branch.state, group.join_state, "join"))
    return list(dict.fromkeys(found))


def path_of(run: RunRecord) -> tuple[set[str], set[tuple[str, str]]]:
    """The states the run visited and the edges its steps (and branches) took."""
    visited = {run.state, *(step.state for step in run.steps)}
    taken: set[tuple[str, str]] = set()
    if run.steps:
        visited.add(graph_svg.START)
        taken.add((graph_svg.START, run.steps[0].state))
    for step in run.steps:
        if step.next_state and step.next_state != step.state:
            taken.add((step.state, step.next_state))
        if step.outcome in ("completed", "failed") and step.next_state is None:
            taken.add((step.state, graph_svg.END))
            visited.add(graph_svg.END)
    for group in run.groups:
        visited.update(branch.state for branch in group.branches)
    joined = {s.state for s in run.steps}
    for source, target, kind in forks_of(run):
        if kind == "fork" or target in joined:
            taken.add((source, target))
    return visited, taken


def run_graph(client: Client, run: RunRecord) -> Markup | None:
    """The run's workflow version as SVG with its path and current state; None when this
    process does not declare that version."""
    try:
        versions = client.workflow(run.workflow)
    except errors.LeaseflowError:
        return None
    wf = next((w for w in versions if w.version == run.version), None)
    if wf is None:
        return None
    visited, taken = path_of(run)
    return graph_svg.render(
        wf,
        current=run.state,
        status=run.status,
        visited=visited,
        taken=taken,
        extra=forks_of(run),
    )
