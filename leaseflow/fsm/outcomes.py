"""What a state function may return."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Next:
    """Move to ``state`` (a plain state name returned by a state means the same)."""

    state: str


@dataclass(frozen=True, slots=True)
class Complete:
    """Finish the run successfully; ``output`` must be JSON-serialisable."""

    output: Any = None


@dataclass(frozen=True, slots=True)
class Failed:
    """Finish the run as failed, with a reason and an optional application error code."""

    reason: str
    code: str | None = None


BRANCH_ERROR_POLICIES = ("fail_fast", "collect")


@dataclass(frozen=True, slots=True)
class Parallel:
    """Run the ``branches`` states side by side, then move to ``join`` exactly once.

    Each branch reads a snapshot of the context and returns a JSON value; the join
    state sees them in order as ``ctx.branch_results``. ``on_branch_error``:
    ``"fail_fast"`` fails the run with ``E-BRANCH-FAILED`` at the first branch that
    fails for good (cancelling the rest); ``"collect"`` runs the join anyway, with
    ``ctx.branch_errors``.
    """

    branches: list[str] | tuple[str, ...]
    join: str
    on_branch_error: str = "fail_fast"


@dataclass(frozen=True, slots=True)
class Map:
    """Run the ``branch`` state once per item (``ctx.item``, ``ctx.index``), at most
    ``max_concurrency`` at a time, then move to ``join`` with the results in item order."""

    items: list[object] | tuple[object, ...]
    branch: str
    join: str
    max_concurrency: int | None = None
    on_branch_error: str = "fail_fast"


@dataclass(frozen=True, slots=True, kw_only=True)
class Wait:
    """Park the run (no lease, no worker, no message) until ``event`` is signalled, then
    move to ``next`` with ``ctx.signal`` set to the signal's payload.

    ``timeout`` (seconds, judged by the database clock): past it the run moves to
    ``on_timeout``, or fails ``E-WAIT-TIMEOUT`` when none is given. With no
    ``event`` it is a durable timer: the run moves to ``next`` once ``timeout`` has
    passed. ``next`` and ``on_timeout`` must be in the state's ``to=``. A signal
    sent before the run reaches the Wait is kept, and resumes it at once.
    """

    next: str
    event: str | None = None
    timeout: float | None = None
    on_timeout: str | None = None


Outcome = Next | Complete | Failed | Parallel | Map | Wait | str
