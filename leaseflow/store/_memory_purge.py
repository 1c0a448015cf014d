"""``MemoryStore``'s retention: ``pg_purge``'s semantics, each batch one atomic
"transaction" under the store's lock, the store's clock the database's."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import timedelta

from leaseflow import errors
from leaseflow.store import _memory as tables
from leaseflow.store import purge_records as pr
from leaseflow.store._memory_ops import Lifecycle
from leaseflow.types import TERMINAL_STATUSES

#: Who a forced purge names in the audit of the locks it frees, and why (as ``pg_purge``).
ACTOR = "purge"
REASON = "run purged"


class Retention(Lifecycle):
    """``purge_runs`` and ``purge_run`` of ``MemoryStore``."""

    def purge_runs(
        self,
        *,
        older_than: float,
        statuses: Sequence[str] = pr.FINISHED,
        dry_run: bool = False,
        batch: int = 500,
        max_runs: int | None = None,
        pause: float = 0.0,  # in memory there is no live work to make room for
    ) -> pr.Purged:
        chosen = pr.check_statuses(statuses)
        pr.check_limits(older_than, batch, max_runs)
        if dry_run:
            with self._lock:
                runs = self._finished(older_than, chosen, max_runs)
                counted = self._count(runs)
                listed = tuple(run.id for run in runs[: pr.LISTED])
                return dataclasses.replace(counted, run_ids=listed, dry_run=True)
        total = pr.Purged()
        while (limit := pr.batch_size(batch, max_runs, total.runs)) > 0:
            with self._lock:  # one batch, one "transaction"
                done = self._delete(self._finished(older_than, chosen, limit))
            total = total.plus(done)
            if done.runs < limit:
                break
        return total

    def purge_run(self, run_id: str, *, force: bool = False) -> pr.Purged:
        with self._lock:
            now = self._now()
            run = self._run(run_id)
            if run.status not in TERMINAL_STATUSES and not force:
                raise errors.RunNotFinished(run_id, run.status)
            for row in list(self._locks.values()):
                if row.token is not None and row.holder_run == run.id:
                    self._audit(row, "forced", ACTOR, REASON, now)
            if run.status not in TERMINAL_STATUSES:
                self.cancel(run.id, REASON)
            return dataclasses.replace(self._delete([run]), run_ids=(run.id,))

    def _finished(
        self, older_than: float, statuses: Sequence[str], limit: int | None
    ) -> list[tables.Run]:
        """Finished runs of ``statuses`` older than ``older_than`` seconds, oldest first."""
        cutoff = self._now() - timedelta(seconds=older_than)
        found = [
            run
            for run in self._runs.values()
            if run.finished_at is not None
            and run.finished_at < cutoff
            and run.status in statuses
            and (not self.scoped or run.tenant == self.tenant)
        ]
        found.sort(key=lambda run: (run.finished_at or cutoff, run.order))
        return found if limit is None else found[:limit]

    def _groups_of(self, runs: Sequence[tables.Run]) -> list[tables.Group]:
        ids = {run.id for run in runs}
        return [group for group in self._groups.values() if group.run_id in ids]

    def _count(self, runs: Sequence[tables.Run]) -> pr.Purged:
        groups = self._groups_of(runs)
        group_ids = {group.id for group in groups}
        return pr.Purged(
            runs=len(runs),
            steps=sum(len(self._steps.get(run.id, ())) for run in runs),
            groups=len(groups),
            branches=sum(1 for group_id, _ in self._branches if group_id in group_ids),
            signals=sum(len(self._signals.get(run.id, ())) for run in runs),
            artifacts=sum(len(self._artifacts.get(run.id, {})) for run in runs),
        )

    def _delete(self, runs: Sequence[tables.Run]) -> pr.Purged:
        """Delete ``runs`` with every row that hangs off them; the counts."""
        done = self._count(runs)
        for group in self._groups_of(runs):
            for idx in range(group.width):
                self._branches.pop((group.id, idx), None)
            del self._groups[group.id]
        for run in runs:
            del self._runs[run.id]
            self._steps.pop(run.id, None)
            self._signals.pop(run.id, None)
            self._artifacts.pop(run.id, None)
        return done
