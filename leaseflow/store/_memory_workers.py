"""``MemoryStore``'s worker registry: dead workers found and their leases expired, a
worker's leases handed back when it shuts down (the semantics of ``pg_beat``'s)."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from leaseflow.store import _memory as tables
from leaseflow.store import records as rec

_EXPIRED = timedelta(milliseconds=1)


class Registry(tables.Tables):
    """Workers as their heartbeats reported them."""

    def reap_dead_workers(self, *, self_id: str, after: float) -> list[str]:
        with self._lock:
            now = self._now()
            dead = [
                worker
                for worker, row in self.workers.items()
                if row.status == "alive"
                and worker != self_id
                and row.last_seen_at < now - timedelta(seconds=after)
            ]
            for worker in dead:
                self.workers[worker].status = "dead"
            owned = set(dead)
            rows: list[tables.Run | tables.Branch] = [*self._runs.values()]
            rows.extend(self._branches.values())
            for row in rows:
                if row.status == "running" and row.lease_owner in owned:
                    assert row.lease_expires_at is not None
                    if row.lease_expires_at > now:
                        row.lease_expires_at = now - _EXPIRED
            return sorted(dead)

    def release_leases_of(self, owners: Sequence[str]) -> rec.Released:
        with self._lock:
            now = self._now()
            owned = set(owners)
            runs: list[rec.Due] = []
            for run in self._runs.values():
                if run.status != "running" or run.lease_owner not in owned:
                    continue
                self._step(
                    run,
                    now,
                    outcome="released",
                    started_at=run.claimed_at,
                    worker=run.lease_owner,
                    lease_token=run.lease_token,
                    error="the worker shut down before the state finished: handed back, "
                    "attempt refunded",
                )
                tables.clear_lease(run)
                self._free_run_lock(run, now)  # taken again, under a higher fence
                run.status, run.attempt = "pending", max(run.attempt - 1, 0)
                run.step_seq += 1
                run.not_before = run.updated_at = now
                run.redispatch_at = self._later(now, self.dispatch_timeout)
                runs.append(
                    rec.Due(
                        run.id,
                        run.workflow,
                        run.version,
                        run.state,
                        run.step_seq,
                        priority=run.priority,
                    )
                )
            branches: list[rec.DueBranch] = []
            for branch in self._branches.values():
                if branch.status != "running" or branch.lease_owner not in owned:
                    continue
                tables.clear_lease(branch)
                branch.status, branch.attempt = "pending", max(branch.attempt - 1, 0)
                branch.not_before = now
                branch.redispatch_at = self._later(now, self.dispatch_timeout)
                run = self._runs[branch.run_id]
                branches.append(
                    rec.DueBranch(
                        branch.run_id,
                        branch.group_id,
                        branch.idx,
                        run.workflow,
                        branch.state,
                        0.0,
                        run.priority,
                        run.version,
                    )
                )
            return rec.Released(tuple(runs), tuple(branches))

    def forget_workers(self, ids: Sequence[str]) -> None:
        with self._lock:
            for worker in ids:
                self.workers.pop(worker, None)

    def list_workers(self, *, limit: int = 1000) -> list[rec.WorkerRecord]:
        with self._lock:
            out = []
            for worker, row in sorted(self.workers.items(), key=lambda i: (i[1].status, i[0])):
                host, _, pid = worker.rpartition(":")
                out.append(
                    rec.WorkerRecord(
                        worker,
                        host or socket.gethostname(),
                        int(pid) if pid.isdigit() else 0,
                        row.queues,
                        row.concurrency,
                        row.started_at or datetime.now(UTC),
                        row.last_seen_at,
                        row.leases_held,
                        row.leases_lost,
                        row.status,
                    )
                )
            return out[:limit]
