"""The Python client: start runs, read them, wait for them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from celery import Celery

from leaseflow import errors, local, logs, messages
from leaseflow.fsm import registry, rules
from leaseflow.fsm.definition import Workflow
from leaseflow.settings import Settings, get_settings
from leaseflow.store import base
from leaseflow.store.records import RunRecord
from leaseflow.tasks import dispatch, runtime
from leaseflow.types import RunStatus

#: A run as the client shows it: status, state, attempt, output, error and its steps.
RunView = RunRecord


class Client:
    """Starts and inspects runs. Cheap to keep for the life of the process."""

    def __init__(
        self,
        database_url: str | None = None,
        broker_url: str | None = None,
        *,
        settings: Settings | None = None,
        app: Celery | None = None,
    ) -> None:
        base = settings or get_settings()
        updates: dict[str, Any] = {}
        if database_url is not None:
            updates["database_url"] = database_url
        if broker_url is not None:
            updates["broker_url"] = broker_url
        chosen = Settings(**{**base.model_dump(), **updates}) if updates else base
        # No database URL: the embedded PostgreSQL under LEASEFLOW_HOME (started or reused).
        self.settings = local.resolve(chosen)  # leaves os.environ alone
        self.store = runtime.make_store(self.settings, application_name="leaseflow-client")
        self._app = app
        self._own_app = False

    @classmethod
    def from_env(cls) -> Client:
        """A client configured from the ``LEASEFLOW_*`` environment."""
        return cls()

    @property
    def app(self) -> Celery:
        if self._app is None:
            from leaseflow.tasks import celery_app

            if celery_app.same_broker(celery_app.get_app(), self.settings):
                self._app = celery_app.get_app()
            else:
                self._app = celery_app.make_app(self.settings)
                self._own_app = True
        return self._app

    def close(self) -> None:
        self.store.close()
        if self._own_app and self._app is not None:
            from leaseflow.tasks import celery_app

            celery_app.dispose_app(self._app)
            self._app = None
            self._own_app = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- starting -------------------------------------------------------------------

    def start(
        self,
        workflow: Workflow | str,
        input: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> str:
        """Create a run and publish its first step; returns the run id.

        The input is validated against the workflow's context model first: invalid
        or non-JSON input raises ``InvalidInput`` and creates nothing. With an
        ``idempotency_key`` already used for this workflow, returns that run's id.
        """
        wf = self._workflow(workflow)
        blob, payload = self._initial_checkpoint(wf, input)
        found = self.store.create_run(
            run_id=str(uuid.uuid4()),
            wf=wf,
            checkpoint=blob,
            input=payload,
            idempotency_key=idempotency_key,
        )
        if found.created:
            self._publish_first(wf, [found.run_id])
        return found.run_id

    def start_many(
        self, workflow: Workflow | str, inputs: Iterable[dict[str, Any] | None]
    ) -> list[str]:
        """Create one run per input in ONE transaction, then publish their first steps
        over one broker connection; returns the run ids in input order.

        Every input is validated before anything is written: one invalid input raises
        ``InvalidInput`` (naming its position) and creates no run at all.
        """
        wf = self._workflow(workflow)
        prepared = []
        for position, payload in enumerate(inputs):
            try:
                prepared.append(self._initial_checkpoint(wf, payload))
            except errors.InvalidInput as exc:
                raise errors.InvalidInput(wf.name, f"input #{position}: {exc.detail}") from exc
        runs = [base.NewRun(str(uuid.uuid4()), blob, payload) for blob, payload in prepared]
        self.store.create_runs(wf=wf, runs=runs)
        run_ids = [run.run_id for run in runs]
        self._publish_first(wf, run_ids)
        return run_ids

    def _workflow(self, workflow: Workflow | str) -> Workflow:
        wf = registry.get(workflow) if isinstance(workflow, str) else workflow
        wf.validate()
        return wf

    def _initial_checkpoint(
        self, wf: Workflow, input: dict[str, Any] | None
    ) -> tuple[bytes, dict[str, Any]]:
        """The validated input and the run's first checkpoint; ``InvalidInput`` if bad."""
        return rules.first_checkpoint(wf, input, runtime.limits(self.settings))

    def _publish_first(self, wf: Workflow, run_ids: list[str]) -> None:
        """Publish the first step of new runs; a failure is left to the dispatcher."""
        for run_id in run_ids:
            logs.info("run_started", run_id=run_id, workflow=wf.name, version=wf.version)
        try:
            dispatch.publish_all(
                self.app,
                [messages.StateStep(run_id, wf.name, wf.initial.name, 1) for run_id in run_ids],
            )
        except Exception as exc:  # the runs are durable: the dispatcher will publish them
            logs.warning("publish_failed", runs=len(run_ids), error=repr(exc))

    # -- reading --------------------------------------------------------------------

    def get(self, run_id: str) -> RunView:
        """The run with its step log; raises ``RunNotFound``."""
        return self.store.get_run(str(run_id))

    def list_runs(
        self,
        status: RunStatus | str | None = None,
        workflow: str | None = None,
        limit: int = 50,
    ) -> list[RunView]:
        """Newest first, without their step logs."""
        if status is not None:
            status = RunStatus(status).value
        return self.store.list_runs(status=status, workflow=workflow, limit=limit)

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
