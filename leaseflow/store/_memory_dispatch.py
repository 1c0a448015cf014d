"""``MemoryStore``'s dispatcher: overdue messages of pending runs and branches, and
queue probes (the semantics of the dispatcher's SQL in ``queries``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from leaseflow.store import _memory as tables
from leaseflow.store import records as rec


class Dispatcher(tables.Tables):
    """The dispatcher: overdue messages of pending runs and branches, queue probes."""

    def _overdue(self, rows: Sequence[tables.Run | tables.Branch], now: datetime) -> list[Any]:
        due = [
            row
            for row in rows
            if row.finished_at is None and row.status == "pending" and row.redispatch_at <= now
        ]
        return sorted(due, key=lambda row: row.redispatch_at)

    def _published_by(self, row: tables.Run | tables.Branch) -> datetime:
        return row.redispatch_at - timedelta(seconds=self.dispatch_timeout)

    def overdue_runs(self, *, limit: int = 1000) -> list[rec.OverdueRun]:
        with self._lock:
            rows: list[tables.Run] = self._overdue(list(self._runs.values()), self._now())[:limit]
            return [
                rec.OverdueRun(run.id, run.workflow, run.state, self._published_by(run))
                for run in rows
            ]

    def overdue_branches(self, *, limit: int = 1000) -> list[rec.OverdueBranch]:
        with self._lock:
            rows: list[tables.Branch] = self._overdue(list(self._branches.values()), self._now())
            return [
                rec.OverdueBranch(
                    b.group_id,
                    b.idx,
                    self._runs[b.run_id].workflow,
                    b.state,
                    self._published_by(b),
                )
                for b in rows[:limit]
            ]

    def redispatch_runs(self, run_ids: Sequence[str]) -> list[rec.Due]:
        with self._lock:
            now = self._now()
            wanted = [self._runs.get(tables.run_key(run_id) or "") for run_id in run_ids]
            due: list[rec.Due] = []
            for run in self._overdue([r for r in wanted if r is not None], now):
                run.redispatch_at = self._later(now, self.dispatch_timeout)
                wait = tables.wait_seconds(run.not_before, now)
                due.append(
                    rec.Due(
                        run.id,
                        run.workflow,
                        run.version,
                        run.state,
                        run.step_seq,
                        wait,
                        run.priority,
                    )
                )
            return due

    def redispatch_branches(self, keys: Sequence[tuple[int, int]]) -> list[rec.DueBranch]:
        with self._lock:
            now = self._now()
            wanted = [self._branches.get((group_id, idx)) for group_id, idx in keys]
            due: list[rec.DueBranch] = []
            for b in self._overdue([b for b in wanted if b is not None], now):
                b.redispatch_at = self._later(now, self.dispatch_timeout)
                run = self._runs[b.run_id]
                wait = tables.wait_seconds(b.not_before, now)
                due.append(
                    rec.DueBranch(
                        b.run_id,
                        b.group_id,
                        b.idx,
                        run.workflow,
                        b.state,
                        wait,
                        run.priority,
                        run.version,
                    )
                )
            return due

    def queue_marks(self, queues: Sequence[str]) -> dict[str, datetime]:
        with self._lock:
            marks = {queue: self._marks.get(queue) for queue in queues}
            return {q: m.passed_at for q, m in marks.items() if m and m.passed_at is not None}

    def send_probe(self, queue: str) -> datetime | None:
        with self._lock:
            now = self._now()
            mark = self._marks.setdefault(queue, tables.Mark())
            sent, passed = mark.probe_sent_at, mark.passed_at
            on_its_way = (
                sent is not None
                and (passed is None or sent > passed)
                and sent >= now - timedelta(seconds=self.dispatch_timeout)
            )
            if on_its_way:
                return None
            mark.probe_sent_at = now
            return now

    def probe_passed(self, queue: str, sent_at: datetime) -> None:
        with self._lock:
            mark = self._marks.get(queue)
            if mark is not None:
                passed = mark.passed_at
                mark.passed_at = sent_at if passed is None else max(passed, sent_at)
