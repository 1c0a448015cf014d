"""Test your workflows in pytest: no PostgreSQL, no broker, no worker, no waiting.

>>> from leaseflow.testing import engine
>>> with engine() as eng:
...     run = eng.start(orders, {"order_id": "A", "amount": 5})
...     eng.run_until_idle()                # every due state and branch, eagerly
...     assert eng.get(run).status == "completed"

The engine runs the production runner, rules and beat jobs in this process, on the
in-memory store (``leaseflow.store.memory``), under a clock that only the test
moves: ``eng.advance(seconds)`` makes retries with backoff come due, leases
expire, timers and wait timeouts fire and run deadlines pass, so a test of an hour
of retries runs in milliseconds. ``eng.signal``, ``eng.cancel`` and ``eng.retry``
do what ``Client.signal``, ``Client.cancel`` and ``Client.retry`` do. Resource locks
(``lock=``) are taken and contended as in production; ``locks.hold(..., store=
eng.store)`` holds one from the test, and ``advance`` past a lock's lease lets the
sweeper free it. Validation, error
codes and the step log are those of production. ``eng.crash_next(state)`` makes
the next attempt of a state die mid-body, as a ``kill -9`` of its worker would: its
lease is held by no one until the reaper hands the run on.
"""

from __future__ import annotations

import heapq
import itertools
import random
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from leaseflow import errors, hooks, logs, messages
from leaseflow.beat import jobs
from leaseflow.context import StateContext
from leaseflow.fsm import registry, rules, waits
from leaseflow.fsm.definition import StateSpec, Workflow
from leaseflow.heartbeat import LeaseKeeper
from leaseflow.runner import Runner, StepResult, call_state
from leaseflow.store import memory
from leaseflow.store.artifact_records import ArtifactRecord
from leaseflow.store.records import CancelResult, RunRecord, SignalReceipt

__all__ = ["Clock", "Engine", "WorkerCrashed", "engine"]

#: Where every engine's clock starts, so step logs are the same on every run.
EPOCH = datetime(2030, 1, 1, tzinfo=UTC)
WORKER = "leaseflow-testing:1"


class WorkerCrashed(BaseException):
    """The simulated death of the worker running a state (``Engine.crash_next``).

    A ``BaseException``, like the ``SystemExit`` of a dying process: the state's own
    ``except Exception`` does not catch it, and nothing is committed.
    """


class Clock:
    """The store's time, moved only by the test."""

    def __init__(self, start: datetime = EPOCH) -> None:
        self._start = start
        self._now = start

    def __call__(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time only moves forward")
        self._now += timedelta(seconds=seconds)

    def monotonic(self) -> float:
        """Seconds since the start: the runner's monotonic clock."""
        return (self._now - self._start).total_seconds()


class Engine:
    """One worker, beat and broker in this process, on the memory store."""

    def __init__(
        self,
        *,
        lease_ttl: float = 60.0,
        max_payload_bytes: int = 1024 * 1024,
        max_checkpoint_bytes: int | None = None,
        inline_max_states: int = 100,
        seed: int = 0,
    ) -> None:
        self.clock = Clock()
        self.store = memory.MemoryStore(clock=self.clock)
        self.limits = rules.Limits(max_payload_bytes, max_checkpoint_bytes=max_checkpoint_bytes)
        self.keeper = LeaseKeeper(
            self.store, worker=WORKER, ttl=lease_ttl, interval=lease_ttl / 4, background=False
        )
        self.runner = Runner(
            self.store,
            self.keeper,
            worker=WORKER,
            ttl=lease_ttl,
            limits=self.limits,
            inline_max_states=inline_max_states,
            inline_max_seconds=float("inf"),
            rand=random.Random(seed).random,
            monotonic=self.clock.monotonic,
            invoke=self._invoke,
        )
        self.lease_ttl = lease_ttl
        #: Every result of every message handled, in order (for assertions).
        self.results: list[StepResult] = []
        self._queue: list[tuple[datetime, int, messages.Message]] = []
        self._order = itertools.count()
        self._crashes: Counter[str] = Counter()
        self._registered: list[Workflow] = []
        self._ids = random.Random(seed)  # run ids, the same on every run of a test

    # -- starting and reading runs -----------------------------------------------------

    def start(
        self,
        workflow: Workflow,
        input: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        priority: int = 0,
    ) -> str:
        """Create a run (validated as ``Client.start`` does) and queue its first step."""
        wf = self._known(workflow.validate())
        try:
            waits.check_priority(priority)
        except ValueError as exc:
            raise errors.InvalidInput(wf.name, str(exc)) from None
        blob, payload = rules.first_checkpoint(wf, input, self.limits)
        found = self.store.create_run(
            run_id=str(uuid.UUID(int=self._ids.getrandbits(128), version=4)),
            wf=wf,
            checkpoint=blob,
            input=payload,
            idempotency_key=idempotency_key,
            priority=priority,
        )
        if found.created:
            first = messages.StateStep(
                found.run_id, wf.name, wf.initial.name, 1, 0.0, priority, wf.version
            )
            self._publish(first)
        return found.run_id

    def signal(
        self, run_id: str, event: str, payload: Any = None, *, signal_id: str | None = None
    ) -> SignalReceipt:
        """Send a signal, as ``Client.signal`` does (the resumed state is queued: run it
        with ``run_until_idle``)."""
        limit = self.limits.max_payload_bytes
        event, given = waits.check_signal(event, payload, signal_id, limit=limit)
        done = self.store.signal(run_id, event, payload, signal_id=given or str(uuid.uuid4()))
        if done.due is not None:
            self._publish(done.due.wakeup())
        return done.receipt

    def cancel(self, run_id: str, reason: str | None = None) -> CancelResult:
        """Cancel a run, as ``Client.cancel`` does."""
        return self.store.cancel(run_id, reason)

    def retry(self, run_id: str, from_state: str | None = None) -> str:
        """Re-drive a failed, cancelled or timed-out run, as ``Client.retry`` does."""
        run = self.store.get_run(run_id, with_steps=False)
        wf = registry.get(run.workflow, run.version)
        target = from_state or run.state
        if target not in wf.states or wf.states[target].branch:
            raise errors.UnknownState(f"{wf.name} v{wf.version}", target)
        due = self.store.redrive(
            run_id,
            from_state=from_state,
            max_attempts=wf.states[target].retry.max_attempts,
            run_timeout=wf.run_timeout,
        )
        self._publish(due.wakeup())
        return due.state

    def deploy(self, workflow: Workflow) -> None:
        """Replace the declared workflow of the same name and version by ``workflow`` (a
        deploy of new code: a new ``context_version``, upcasters, ``regather=``); runs
        in flight go on under it."""
        workflow.validate()
        try:
            old = registry.get(workflow.name, workflow.version)
        except errors.UnknownWorkflow:
            old = None
        if old is not None and old is not workflow:
            registry.unregister(old)
        self._known(workflow)
        self.store.register_workflow(workflow)

    def get(self, run_id: str) -> RunRecord:
        """The run with its step log and groups, as ``Client.get`` returns it."""
        return self.store.get_run(run_id)

    def artifact(self, run_id: str, name: str) -> ArtifactRecord:
        """An artefact of the run with its bytes, as ``Client.artifact`` returns it."""
        return self.store.get_artifact(run_id, name)

    @property
    def in_commit_log(self) -> list[Any]:
        """The ``ctx.in_commit`` writes that committed, in order."""
        return self.store.in_commit_log

    # -- moving the engine -------------------------------------------------------------

    def run_until_idle(self, *, max_steps: int = 100_000) -> int:
        """Handle every message that is due now, and those they publish, until none is
        left; returns how many were handled. Time does not move. The lifecycle hooks of
        what committed have run when it returns (``leaseflow.hooks.flush``)."""
        handled = 0
        while self._queue and self._queue[0][0] <= self.clock():
            if handled >= max_steps:
                raise RuntimeError(f"still busy after {max_steps} messages: a loop?")
            _, _, message = heapq.heappop(self._queue)
            self._handle(message)
            handled += 1
        hooks.flush()
        return handled

    def advance(self, seconds: float) -> None:
        """Move the clock by ``seconds``, handling what comes due on the way in time
        order (retries, deferred steps), with the reaper at every stop."""
        target = self.clock() + timedelta(seconds=seconds)
        while True:
            self.run_until_idle()
            self._beat()
            self.run_until_idle()
            due = self._queue[0][0] if self._queue else None
            if due is None or due > target:
                break
            self.clock.advance(max(0.0, (due - self.clock()).total_seconds()))
        self.clock.advance(max(0.0, (target - self.clock()).total_seconds()))
        self._beat()
        self.run_until_idle()

    def run_until_done(self, run_id: str, *, max_seconds: float = 86_400.0) -> RunRecord:
        """Skip time until the run is finished (or ``max_seconds`` have passed)."""
        deadline = self.clock() + timedelta(seconds=max_seconds)
        while True:
            self.run_until_idle()
            run = self.store.get_run(run_id, with_steps=False)
            if run.terminal or self.clock() >= deadline:
                return self.get(run_id)
            due = (
                self._queue[0][0]
                if self._queue
                else self.clock() + timedelta(seconds=self.lease_ttl)
            )
            step = min(max((due - self.clock()).total_seconds(), 0.001), self.lease_ttl)
            self.advance(min(step, (deadline - self.clock()).total_seconds()))

    def crash_next(self, state: str, times: int = 1) -> None:
        """The next ``times`` attempts of ``state`` die mid-body (``WorkerCrashed``):
        nothing is committed, the lease stays held until it expires and the reaper
        requeues the run (or fails it ``E-LEASE-EXPIRED`` once its attempts are spent)."""
        self._crashes[state] += times

    def pending(self) -> list[messages.Message]:
        """The messages queued (due or not), in due order."""
        return [message for _, _, message in sorted(self._queue)]

    def close(self) -> None:
        self.keeper.stop()
        self.store.close()
        for wf in self._registered:
            registry.unregister(wf)
        self._registered.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside ----------------------------------------------------------------------

    def _known(self, wf: Workflow) -> Workflow:
        """Workers find workflows in the registry: add one declared with register=False."""
        try:
            if registry.get(wf.name, wf.version) is wf:
                return wf
        except errors.UnknownWorkflow:
            pass  # declared with register=False: register it below
        registry.register(wf)
        self._registered.append(wf)
        return wf

    def _publish(self, message: messages.Message) -> None:
        due = self.clock() + timedelta(seconds=max(0.0, message.countdown))
        heapq.heappush(self._queue, (due, next(self._order), message))

    def _handle(self, message: messages.Message) -> None:
        try:
            result = self.runner.handle(message)
        except WorkerCrashed:
            logs.warning(
                "worker_crashed",
                run_id=message.run_id,
                state=message.state,
                workflow=message.workflow,
            )
            return  # the message dies with the worker; the lease waits for the reaper
        self.results.append(result)
        if result.fork is not None:
            for branch in result.fork.branches:
                self._publish(branch)
        for follow in result.wakeups:
            self._publish(follow)

    def _invoke(self, spec: StateSpec, ctx: StateContext[Any]) -> Any:
        if self._crashes[spec.name] > 0:
            self._crashes[spec.name] -= 1
            raise WorkerCrashed(f"worker died in state {spec.name!r} of run {ctx.run_id}")
        started = self.clock()
        returned = call_state(spec, ctx)
        elapsed = (self.clock() - started).total_seconds()
        if spec.timeout is not None and elapsed > spec.timeout:
            # What Celery raises in a state past its soft time limit (timeout=).
            raise SoftTimeLimitExceeded(f"state {spec.name!r} ran {elapsed:.1f}s")
        return returned

    def _beat(self) -> None:
        jobs.sweep_locks(self.store)
        for message in jobs.reap(self.store) + jobs.sweep_timeouts(self.store):
            self._publish(message)


@contextmanager
def engine(**options: Any) -> Iterator[Engine]:
    """An ``Engine`` for the ``with`` block (see ``Engine`` for the options)."""
    eng = Engine(**options)
    try:
        yield eng
    finally:
        eng.close()
