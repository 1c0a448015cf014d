"""``ctx``: what a state function receives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from leaseflow import heartbeat
from leaseflow.artifacts import Artifacts
from leaseflow.store import records

D = TypeVar("D")


@dataclass
class StateContext(Generic[D]):
    """What a state function receives as ``ctx`` (``Context[MyModel]`` in annotations)."""

    data: D
    run_id: str
    state: str
    attempt: int
    input: dict[str, Any]
    fencing_token: str
    step_seq: int
    workflow: str
    _keeper: heartbeat.LeaseKeeper = field(repr=False)
    _in_commit: list[records.InCommit] = field(default_factory=list, repr=False)
    #: In a join: each branch's result in branch (item) order; None for a failed one.
    branch_results: list[Any] = field(default_factory=list)
    #: In a join: ``{index: error}`` of the branches that failed (``collect`` policy).
    branch_errors: dict[int, str] = field(default_factory=dict)
    #: In a map branch: the item and its index; in a parallel branch: its index.
    item: Any = None
    index: int | None = None
    #: In the state a signal resumed: the signal's payload (a JSON value).
    signal: Any = None
    #: While the run holds a resource lock (``lock=``): its fence, higher for every
    #: acquisition of the key; pass it to the resource so it refuses older holders.
    lock_token: int | None = None
    #: Large values beside the run, by reference: ``ref = ctx.artifacts.put(name, data)``
    #: (written with this state's commit), ``ctx.artifacts.get(ref)``.
    artifacts: Artifacts = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.artifacts is None:  # no store: this attempt's own puts only
            self.artifacts = Artifacts(None, self.run_id, self.state, None, sink=self._in_commit)

    def join(self, branches: list[records.BranchResult]) -> None:
        """Give a join state its group's results (None for a failed branch) and errors."""
        for branch in branches:
            completed = branch.status == "completed"
            self.branch_results.append(branch.result if completed else None)
            if not completed:
                self.branch_errors[branch.idx] = branch.error or branch.status

    def heartbeat(self) -> None:
        """Extend this run's lease now; raises ``LeaseLost`` if another worker took it."""
        self._keeper.beat_now(self.fencing_token)

    def lease_lost(self) -> bool:
        """True once the heartbeat learnt that this lease is gone: stop early."""
        return self._keeper.lost(self.fencing_token)

    def cancel_requested(self) -> bool:
        """True once the heartbeat learnt that the run was cancelled (``client.cancel``):
        stop early. Whatever the state returns, its commit ends the run ``cancelled``
        and the next state never runs. ``ctx.heartbeat()`` asks at once."""
        return self._keeper.cancel_requested(self.fencing_token)

    def in_commit(self, fn: Callable[[Any], None]) -> None:
        """Run ``fn(conn)`` inside the transition's own transaction (a psycopg
        connection; on the memory store, a recording stand-in).

        Its writes commit exactly when the transition does: never for a worker whose
        lease was lost, never for an attempt that raised.
        """
        self._in_commit.append(fn)
