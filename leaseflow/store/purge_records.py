"""What a purge deleted (or, dry, would delete), and the checks both stores make of a
purge's arguments."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from leaseflow.types import TERMINAL_STATUSES, RunStatus

#: The statuses a purge takes by default: every finished one.
FINISHED: tuple[str, ...] = (
    RunStatus.COMPLETED.value,
    RunStatus.FAILED.value,
    RunStatus.CANCELLED.value,
    RunStatus.TIMED_OUT.value,
)
#: Seconds a purge rests between two batches by default (a batch of 500 runs takes
#: ~15 ms): the live runs keep most of the database (``python -m benchmarks purge``).
PAUSE = 0.05
#: How many run ids a dry run lists.
LISTED = 100


@dataclass(frozen=True, slots=True)
class Purged:
    """Rows deleted by a purge, by table (a dry run: rows it would delete). ``run_ids``:
    the run ``purge_run`` deleted, or the first ``LISTED`` runs of a dry run."""

    runs: int = 0
    steps: int = 0
    groups: int = 0
    branches: int = 0
    signals: int = 0
    artifacts: int = 0
    run_ids: tuple[str, ...] = ()
    dry_run: bool = False

    @property
    def total(self) -> int:
        """Every row, all tables together."""
        return self.runs + self.steps + self.groups + self.branches + self.signals + self.artifacts

    def plus(self, other: Purged) -> Purged:
        """Both purges' counts together (the batches of one purge)."""
        return replace(
            self,
            runs=self.runs + other.runs,
            steps=self.steps + other.steps,
            groups=self.groups + other.groups,
            branches=self.branches + other.branches,
            signals=self.signals + other.signals,
            artifacts=self.artifacts + other.artifacts,
            run_ids=(self.run_ids + other.run_ids)[:LISTED],
        )

    def counts(self) -> dict[str, int]:
        """Rows by table (for log lines)."""
        return {
            "runs": self.runs,
            "steps": self.steps,
            "groups": self.groups,
            "branches": self.branches,
            "signals": self.signals,
            "artifacts": self.artifacts,
        }

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["run_ids"] = list(self.run_ids)
        out["total"] = self.total
        return out


def check_statuses(statuses: Sequence[str]) -> tuple[str, ...]:
    """The statuses a purge may take: finished ones only (``ValueError`` otherwise)."""
    if isinstance(statuses, str):
        statuses = (statuses,)
    chosen = tuple(dict.fromkeys(str(s) for s in statuses))
    if not chosen:
        raise ValueError("purge needs at least one status")
    active = [s for s in chosen if s not in TERMINAL_STATUSES]
    if active:
        raise ValueError(
            f"only finished runs can be purged: {', '.join(map(repr, active))} is not one of "
            f"{', '.join(FINISHED)}"
        )
    return chosen


def check_limits(older_than: float, batch: int, max_runs: int | None) -> None:
    """``ValueError`` for a negative age, an empty batch or a negative ``max_runs``."""
    if not older_than >= 0:  # NaN too
        raise ValueError(f"older_than must be 0 or more seconds, not {older_than!r}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch!r}")
    if max_runs is not None and max_runs < 0:
        raise ValueError(f"max_runs must be 0 or more, not {max_runs!r}")


def batch_size(batch: int, max_runs: int | None, done: int) -> int:
    """How many runs the next batch may take (0: the purge is done)."""
    return batch if max_runs is None else max(0, min(batch, max_runs - done))
