"""The client's operator side: retention, resource locks, the worker registry and the
workflows this process declares (``Client`` inherits them)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from leaseflow import logs
from leaseflow.fsm import graph, registry
from leaseflow.fsm.definition import Workflow
from leaseflow.store import base, purge_records
from leaseflow.store.lock_records import LockAudit, LockFreed, LockRecord
from leaseflow.store.purge_records import Purged
from leaseflow.store.records import WorkerRecord


class Admin:
    """Operations an operator (or an admin token) performs."""

    store: base.RunStore

    # -- retention ------------------------------------------------------------------

    def purge(
        self,
        older_than: float | timedelta,
        *,
        statuses: Sequence[str] = purge_records.FINISHED,
        dry_run: bool = False,
        max_runs: int | None = None,
        pause: float = purge_records.PAUSE,
    ) -> Purged:
        """Delete finished runs of ``statuses`` that finished more than ``older_than``
        (seconds, or a ``timedelta``) ago, with their steps, groups, branches, signals
        and artifacts, in small batches ``pause`` seconds apart (room for live runs);
        ``dry_run`` only counts them. Returns what was
        (or would be) deleted. ``ValueError`` for an active status or a negative age."""
        seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
        done = self.store.purge_runs(
            older_than=float(seconds),
            statuses=statuses,
            dry_run=dry_run,
            max_runs=max_runs,
            pause=pause,
        )
        if not dry_run:
            logs.info("runs_purged", older_than=seconds, **done.counts())
        return done

    def purge_run(self, run_id: str, *, force: bool = False) -> Purged:
        """Delete one run with its rows. ``RunNotFound``; ``RunNotFinished``
        (``E-RUN-ACTIVE``) for an active run unless ``force``: then it is cancelled first
        (a running state is fenced off: its commit finds no run) and deleted."""
        done = self.store.purge_run(str(run_id), force=force)
        logs.info("run_purged", run_id=str(run_id), force=force, **done.counts())
        return done

    # -- locks, workers, workflows ------------------------------------------------------

    def locks(self, *, limit: int = 1000) -> list[LockRecord]:
        """Resource locks held now, by whom, with their fences."""
        return self.store.list_locks(limit=limit)

    def lock_audit(self, key: str | None = None, *, limit: int = 100) -> list[LockAudit]:
        """Locks freed by someone other than their holder, newest first."""
        return self.store.lock_audit(key, limit=limit)

    def release_lock(self, key: str, *, actor: str, reason: str) -> LockFreed:
        """Free a lock whoever holds it (audited as ``forced``); its holder's next
        commit is refused. Raises ``LockNotFound`` when it is not held."""
        freed = self.store.force_release(key, actor=actor, reason=reason)
        logs.warning("lock_forced", key=key, actor=actor, reason=reason)
        return freed

    def workers(self, *, limit: int = 1000) -> list[WorkerRecord]:
        """The worker registry: queues, pool size, leases held, last check-in."""
        return self.store.list_workers(limit=limit)

    def workflows(self) -> list[Workflow]:
        """Every version of every workflow declared in this process."""
        return registry.all_workflows()

    def workflow(self, name: str) -> list[Workflow]:
        """The versions of one workflow declared here, oldest first; ``UnknownWorkflow``."""
        found = [registry.get(name, v) for v in registry.versions(name)]
        return found or [registry.get(name)]  # none: raises, naming what is declared

    @staticmethod
    def describe(wf: Workflow) -> dict[str, Any]:
        """A workflow version as JSON: states, edges and its Mermaid source."""
        return {
            "name": wf.name,
            "version": wf.version,
            "context_version": wf.context_version,
            "initial": wf.initial.name,
            "states": sorted(wf.states),
            "edges": [[a or None, b] for a, b in wf.edges()],  # None: the entry
            "mermaid": graph.render(wf, "mermaid"),
        }
