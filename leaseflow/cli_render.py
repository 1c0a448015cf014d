"""How the CLI shows runs: rich tables for people (never wrapped in a pipe), JSON
for machines."""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from leaseflow.store.records import (
        GroupRecord,
        LockRecord,
        RunRecord,
        StepRecord,
        WorkerRecord,
    )

#: Width of tables written to a pipe or file, so ids and timestamps never wrap.
PIPE_WIDTH = 200


def console() -> Console:
    """A console on stdout; in a pipe or file ``PIPE_WIDTH`` wide (unless ``COLUMNS``)."""
    from rich.console import Console

    out = Console(markup=False, highlight=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(markup=False, highlight=False, width=PIPE_WIDTH)
    return out


def when(value: datetime | None) -> str:
    return "" if value is None else value.isoformat(sep=" ", timespec="seconds")


def summary(error: str | None) -> str:
    """One line of an error: the exception line of a traceback, else the first line."""
    if not error:
        return ""
    lines = [line for line in error.strip().splitlines() if line.strip()]
    if lines[0].startswith("Traceback"):
        return lines[-1].strip()
    return lines[0].strip()


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def runs_table(found: list[RunRecord]) -> Table:
    """``runs list``: one row per run."""
    from rich.table import Table

    table = Table(title=f"{len(found)} run(s)", title_justify="left")
    for column in ("id", "workflow", "status", "state", "attempt", "error_code"):
        table.add_column(column, no_wrap=column == "id")
    table.add_column("created", no_wrap=True)
    table.add_column("updated", no_wrap=True)
    for run in found:
        table.add_row(
            run.id,
            f"{run.workflow} v{run.version}",
            run.status,
            run.state,
            f"{run.attempt}/{run.max_attempts}",
            run.error_code or "",
            when(run.created_at),
            when(run.updated_at),
        )
    return table


def print_run(run: RunRecord) -> None:
    from rich.table import Table

    details = Table.grid(padding=(0, 2))
    details.add_column(style="bold")
    details.add_column()
    rows: list[tuple[str, str]] = [
        ("id", run.id),
        ("workflow", f"{run.workflow} v{run.version}"),
        ("status", run.status),
        ("state", run.state + (f" (from {run.prev_state})" if run.prev_state else "")),
        # step_seq is the seq the next step will get: a finished run shows its count.
        ("steps", str(len(run.steps)) + ("" if run.terminal else f" (next: seq {run.step_seq})")),
        ("attempt", f"{run.attempt}/{run.max_attempts}"),
        ("created", when(run.created_at)),
        ("updated", when(run.updated_at)),
    ]
    if run.finished_at is not None:
        rows.append(("finished", when(run.finished_at)))
    if run.lease_owner is not None:
        rows.append(("lease", f"{run.lease_owner} until {when(run.lease_expires_at)}"))
    if run.status == "waiting" and run.wait_event is not None:
        until = f" until {when(run.wait_deadline)}" if run.wait_deadline else ""
        rows.append(("waiting for", f"signal {run.wait_event!r}{until}"))
    elif run.status == "waiting" and run.wait_deadline is not None:
        rows.append(("waiting for", f"a timer ending {when(run.wait_deadline)}"))
    if run.cancel_requested and not run.terminal:
        rows.append(("cancel", "requested: the running state stops at its commit"))
    if run.run_deadline is not None:
        rows.append(("deadline", when(run.run_deadline)))
    if run.priority:
        rows.append(("priority", str(run.priority)))
    if run.idempotency_key is not None:
        rows.append(("idempotency key", run.idempotency_key))
    rows.append(("input", json.dumps(run.input, ensure_ascii=False)))
    if run.output is not None:
        rows.append(("output", json.dumps(run.output, ensure_ascii=False, default=str)))
    if run.error_code is not None or run.error is not None:
        rows.append(("error", f"{run.error_code or ''} {run.error or ''}".strip()))
    for key, value in rows:
        details.add_row(key, value)

    steps = Table(title=f"{len(run.steps)} step(s)", title_justify="left")
    for column in ("seq", "state", "attempt", "outcome", "next_state"):
        steps.add_column(column)
    steps.add_column("started", no_wrap=True)
    steps.add_column("finished", no_wrap=True)
    steps.add_column("ms", justify="right")
    steps.add_column("context", justify="right")
    steps.add_column("worker")
    steps.add_column("error")
    for step in run.steps:
        steps.add_row(
            str(step.seq),
            step.state,
            str(step.attempt),
            step.outcome,
            step.next_state or "",
            when(step.started_at),
            when(step.finished_at),
            "" if step.duration_ms is None else str(step.duration_ms),
            _sizes(step),
            step.worker or "",
            summary(step.error),
        )
    out = console()
    out.print(details)
    out.print()
    out.print(steps)
    for group in run.groups:
        out.print()
        out.print(_group_table(group))
    if run.signals:
        out.print()
        out.print(_signals_table(run))
    if run.artifacts:
        out.print()
        out.print(_artifacts_table(run))


def _artifacts_table(run: RunRecord) -> Any:
    from rich.table import Table

    table = Table(title=f"{len(run.artifacts)} artifact(s)", title_justify="left")
    for column in ("name", "content type", "size", "stored", "state", "seq", "created"):
        table.add_column(column)
    for art in run.artifacts:
        table.add_row(
            art.name,
            art.content_type or "",
            _kb(art.size_bytes),
            _kb(art.stored_bytes),
            art.state or "",
            "" if art.step_seq is None else str(art.step_seq),
            when(art.created_at),
        )
    return table


def locks_table(held: list[LockRecord]) -> Any:
    from rich.table import Table

    table = Table(title=f"{len(held)} lock(s) held", title_justify="left")
    for column in ("key", "holder", "state", "since", "expires", "fence"):
        table.add_column(column)
    for lock in held:
        expires = when(lock.expires_at) + (" (expired)" if lock.expired else "")
        table.add_row(
            lock.key,
            lock.holder or "",
            lock.holder_state or "",
            when(lock.acquired_at),
            expires,
            str(lock.fence),
        )
    return table


def workers_table(found: list[WorkerRecord]) -> Any:
    from rich.table import Table

    table = Table(title=f"{len(found)} worker process(es)", title_justify="left")
    for column in ("id", "status", "queues", "pool", "started", "last seen", "leases", "lost"):
        table.add_column(column)
    for worker in found:
        table.add_row(
            worker.id,
            worker.status,
            worker.queues or "",
            "" if worker.concurrency is None else str(worker.concurrency),
            when(worker.started_at),
            when(worker.last_seen_at),
            str(worker.leases_held),
            str(worker.leases_lost),
        )
    return table


def _signals_table(run: RunRecord) -> Any:
    from rich.table import Table

    table = Table(title=f"{len(run.signals)} signal(s)", title_justify="left")
    for column in ("id", "event", "received", "consumed at step", "payload"):
        table.add_column(column)
    for signal in run.signals:
        table.add_row(
            signal.signal_id,
            signal.event,
            when(signal.received_at),
            "" if signal.consumed_seq is None else str(signal.consumed_seq),
            summary(json.dumps(signal.payload, ensure_ascii=False, default=str)),
        )
    return table


def _group_table(group: GroupRecord) -> Any:
    """One Parallel/Map group: its counters and each branch's state, result or error."""
    from rich.table import Table

    title = (
        f"{group.kind} group {group.id} (step {group.parent_seq}): "
        f"{group.done} done, {group.failed} failed of {group.width}, "
        f"{group.status}, join {group.join_state!r}, {group.on_branch_error}"
    )
    table = Table(title=title, title_justify="left")
    for column in ("branch", "state", "status", "result / error"):
        table.add_column(column)
    for branch in group.branches:
        shown = branch.error if branch.error else json.dumps(branch.result, default=str)
        table.add_row(str(branch.idx), branch.state, branch.status, summary(shown))
    return table


def _sizes(step: StepRecord) -> str:
    """``12.3 KB -> 2.1 KB (17%)``: the context's JSON and its stored checkpoint."""
    ratio = step.checkpoint_ratio
    if ratio is None or step.context_bytes is None or step.checkpoint_bytes is None:
        return ""
    return f"{_kb(step.context_bytes)} -> {_kb(step.checkpoint_bytes)} ({ratio:.0%})"


def _kb(size: int) -> str:
    return f"{size} B" if size < 1024 else f"{size / 1024:.1f} KB"
