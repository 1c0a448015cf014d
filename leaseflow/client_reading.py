"""The client's reading side: a run with its step log, its artefacts, pages of runs,
and waiting for a run to finish (``Client`` inherits them)."""

from __future__ import annotations

import time
from datetime import datetime

from leaseflow.store import base
from leaseflow.store.artifact_records import ArtifactRecord
from leaseflow.store.records import RunRecord
from leaseflow.types import RunStatus

#: A run as the client shows it: status, state, attempt, output, error and its steps.
RunView = RunRecord


class Reading:
    """Reads through ``store`` (the client's, tenant-scoped or not)."""

    store: base.RunStore

    def get(self, run_id: str) -> RunView:
        """The run with its step log; raises ``RunNotFound``."""
        return self.store.get_run(str(run_id))

    def artifact(self, run_id: str, name: str) -> ArtifactRecord:
        """An artefact of the run (``ctx.artifacts.put``) with its bytes (``.data``,
        ``.text``); raises ``ArtifactNotFound``, ``RunNotFound``."""
        return self.store.get_artifact(str(run_id), name)

    def list_runs(
        self,
        status: RunStatus | str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        *,
        tenant: str | None = None,
        before: tuple[datetime, str] | None = None,
    ) -> list[RunView]:
        """Newest first, without their step logs; ``before``: the ``(created_at, id)``
        of the last run of the previous page; ``tenant``: only that tenant's."""
        if status is not None:
            status = RunStatus(status).value
        return self.store.list_runs(
            status=status, workflow=workflow, limit=limit, tenant=tenant, before=before
        )

    def wait_for(self, run_id: str, timeout: float = 60.0, *, poll: float = 0.05) -> RunView:
        """Block until the run is terminal and return it; ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout
        delay = poll
        while True:
            run = self.store.get_run(str(run_id), with_steps=False)
            if run.terminal:
                return self.store.get_run(str(run_id))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"run {run_id} is still {run.status} in state {run.state!r} after {timeout}s"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 0.5)
