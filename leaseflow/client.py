"""The Python client: start runs, signal, cancel and re-drive them, read them, wait
for them."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable
from typing import Any

from celery import Celery

from leaseflow import errors, local, logs, messages
from leaseflow.client_admin import Admin
from leaseflow.client_reading import Reading, RunView
from leaseflow.fsm import registry, rules, waits
from leaseflow.fsm.definition import Workflow
from leaseflow.settings import Settings, get_settings
from leaseflow.store import base
from leaseflow.store.records import CancelResult, SignalReceipt
from leaseflow.tasks import dispatch, runtime

__all__ = ["Client", "RunView"]


class Client(Admin, Reading):
    """Starts and inspects runs. Cheap to keep for the life of the process.

    ``tenant=`` scopes it to one tenant: its runs are created with that tenant, and it
    sees and acts on that tenant's runs only (PostgreSQL's row-level security; another
    tenant's run is ``RunNotFound``). ``for_tenant`` gives such a view of a client."""

    def __init__(
        self,
        database_url: str | None = None,
        broker_url: str | None = None,
        *,
        settings: Settings | None = None,
        app: Celery | None = None,
        tenant: str | None = None,
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
        self.engine_store = runtime.make_store(self.settings, application_name="leaseflow-client")
        self.tenant = tenant
        self.store = self.engine_store if tenant is None else self.engine_store.for_tenant(tenant)
        self._app = app
        self._own_app = False
        self._owner = True

    def for_tenant(self, tenant: str) -> Client:
        """A view of this client scoped to ``tenant`` (same connections and broker;
        closing the view closes nothing)."""
        view = copy.copy(self)
        view.tenant, view.store, view._owner = tenant, self.engine_store.for_tenant(tenant), False
        return view

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
        if not self._owner:
            return
        self.engine_store.close()
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
        version: int | None = None,
        priority: int = 0,
    ) -> str:
        """Create a run and publish its first step; returns the run id.

        A workflow named by a string runs its newest version declared in this process
        unless ``version`` is given; the run keeps its version for life. ``priority``
        (0, the default, to 9, the most urgent) goes with every message of the run.
        The input is validated against the workflow's context model first: invalid
        or non-JSON input raises ``InvalidInput`` and creates nothing. With an
        ``idempotency_key`` already used for this workflow, returns that run's id.
        """
        run_id, _ = self.start_with(
            workflow, input, idempotency_key=idempotency_key, version=version, priority=priority
        )
        return run_id

    def start_with(
        self,
        workflow: Workflow | str,
        input: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        version: int | None = None,
        priority: int = 0,
    ) -> tuple[str, bool]:
        """As ``start``; returns ``(run_id, created)``: ``created`` is False when the
        ``idempotency_key`` named a run already (``IdempotencyConflict`` if its input
        differs)."""
        wf = self._workflow(workflow, version)
        priority = self._priority(wf, priority)
        blob, payload = self._initial_checkpoint(wf, input)
        found = self.store.create_run(
            run_id=str(uuid.uuid4()),
            wf=wf,
            checkpoint=blob,
            input=payload,
            idempotency_key=idempotency_key,
            priority=priority,
        )
        if found.created:
            self._publish_first(wf, [found.run_id], priority)
        return found.run_id, found.created

    def start_many(
        self,
        workflow: Workflow | str,
        inputs: Iterable[dict[str, Any] | None],
        *,
        version: int | None = None,
        priority: int = 0,
    ) -> list[str]:
        """Create one run per input in ONE transaction, then publish their first steps
        over one broker connection; returns the run ids in input order.

        Every input is validated before anything is written: one invalid input raises
        ``InvalidInput`` (naming its position) and creates no run at all.
        """
        wf = self._workflow(workflow, version)
        priority = self._priority(wf, priority)
        prepared = []
        for position, payload in enumerate(inputs):
            try:
                prepared.append(self._initial_checkpoint(wf, payload))
            except errors.InvalidInput as exc:
                raise errors.InvalidInput(wf.name, f"input #{position}: {exc.detail}") from exc
        runs = [
            base.NewRun(str(uuid.uuid4()), blob, payload, priority) for blob, payload in prepared
        ]
        self.store.create_runs(wf=wf, runs=runs)
        run_ids = [run.run_id for run in runs]
        self._publish_first(wf, run_ids, priority)
        return run_ids

    def _workflow(self, workflow: Workflow | str, version: int | None = None) -> Workflow:
        if isinstance(workflow, str):
            wf = registry.get(workflow, version)
        elif version is not None and version != workflow.version:
            wf = registry.get(workflow.name, version)
        else:
            wf = workflow
        wf.validate()
        return wf

    @staticmethod
    def _priority(wf: Workflow, priority: int) -> int:
        try:
            return waits.check_priority(priority)
        except ValueError as exc:
            raise errors.InvalidInput(wf.name, str(exc)) from None

    def _initial_checkpoint(
        self, wf: Workflow, input: dict[str, Any] | None
    ) -> tuple[bytes, dict[str, Any]]:
        """The validated input and the run's first checkpoint; ``InvalidInput`` if bad."""
        return rules.first_checkpoint(wf, input, runtime.limits(self.settings))

    def _publish_first(self, wf: Workflow, run_ids: list[str], priority: int = 0) -> None:
        """Publish the first step of new runs; a failure is left to the dispatcher."""
        for run_id in run_ids:
            logs.info("run_started", run_id=run_id, workflow=wf.name, version=wf.version)
        first = wf.initial.name
        self._publish(
            [
                messages.StateStep(run_id, wf.name, first, 1, 0.0, priority, wf.version)
                for run_id in run_ids
            ]
        )

    def _publish(self, wakeups: list[messages.Message]) -> None:
        """Publish wake-ups of runs made pending; a failure is left to the dispatcher."""
        try:
            dispatch.publish_all(self.app, wakeups)
        except Exception as exc:  # the runs are durable: the dispatcher will publish them
            logs.warning("publish_failed", runs=len(wakeups), error=repr(exc))

    # -- signals, cancel, re-drive --------------------------------------------------

    def signal(
        self,
        run_id: str,
        event: str,
        payload: Any = None,
        *,
        signal_id: str | None = None,
    ) -> SignalReceipt:
        """Send ``event`` (with a JSON ``payload``) to a run.

        If the run waits for ``event`` it resumes at once at the Wait's ``next``, with
        ``ctx.signal`` = ``payload``; otherwise the signal is stored and consumed by the
        first Wait for ``event`` the run reaches (never lost). The same ``signal_id``
        twice is delivered once (the receipt says ``duplicate``). Raises
        ``RunNotFound``, ``RunFinished`` (``E-RUN-FINISHED``), ``InvalidSignal``,
        ``PayloadTooLarge``.
        """
        limit = self.settings.max_payload_bytes
        event, given = waits.check_signal(event, payload, signal_id, limit=limit)
        done = self.store.signal(str(run_id), event, payload, signal_id=given or str(uuid.uuid4()))
        if done.due is not None:
            self._publish([done.due.wakeup()])
        logs.info(
            "signal_received",
            run_id=str(run_id),
            event=event,
            signal_id=done.receipt.signal_id,
            result=done.receipt.result,
            state=done.receipt.state,  # the run's, after the signal
            step_seq=done.due.step_seq if done.due else None,
            workflow=done.due.workflow if done.due else None,
        )
        return done.receipt

    def cancel(self, run_id: str, reason: str | None = None) -> CancelResult:
        """Cancel a run: a pending or waiting one is ``cancelled`` at once; a running
        state learns it at its next heartbeat (``ctx.cancel_requested()``) and its
        commit ends the run ``cancelled`` instead of advancing. Idempotent: a finished
        run is left alone (``result="finished"``). Raises ``RunNotFound``."""
        done = self.store.cancel(str(run_id), reason)
        logs.info("run_cancel", run_id=str(run_id), result=done.result, reason=reason)
        return done

    def retry(self, run_id: str, from_state: str | None = None) -> str:
        """Re-drive a ``failed``, ``cancelled`` or ``timed_out`` run: back to pending at
        the state where it stopped (or ``from_state`` of its version), with its last
        checkpoint and a fresh attempt budget; the step log keeps the history and a
        ``redriven`` step. Returns the state it resumes at. Raises ``RunActive``,
        ``RunCompleted``, ``UnknownState``, ``RunNotFound``."""
        run = self.store.get_run(str(run_id), with_steps=False)
        max_attempts = run_timeout = None
        try:
            wf = registry.get(run.workflow, run.version)
        except errors.UnknownWorkflow:
            wf = None  # the store still checks that the state exists in that version
        if wf is not None:
            target = from_state or run.state
            if target not in wf.states or wf.states[target].branch:
                raise errors.UnknownState(f"{wf.name} v{wf.version}", target)
            max_attempts = wf.states[target].retry.max_attempts
            run_timeout = wf.run_timeout
        due = self.store.redrive(
            str(run_id),
            from_state=from_state,
            max_attempts=max_attempts,
            run_timeout=run_timeout,
        )
        logs.info(
            "run_redriven",
            run_id=str(run_id),
            state=due.state,
            step_seq=due.step_seq,
            workflow=due.workflow,
        )
        self._publish([due.wakeup()])
        return due.state
