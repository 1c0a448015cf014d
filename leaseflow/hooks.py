"""Lifecycle hooks: user functions called after a commit, fire-and-forget.

Register them per workflow (``wf.on_transition(fn)``, ``wf.on_run_finished(fn)``,
``wf.on_group_finished(fn)``) or for every workflow (``hooks.on("transition", fn)``).
Each is called with a :class:`Event` once the commit it reports has landed, never
before and never inside it: the runner only puts the call on a bounded queue of its
process, and one daemon thread runs the queue. So a slow hook delays no state and no
commit; when the queue is full the call is dropped (counted in
``leaseflow_hooks_dropped_total``, logged). A hook that raises is logged and counted
(``leaseflow_hook_errors_total``) and changes nothing. A hook may be a coroutine
function: it runs to completion on an event loop of the hook thread.

Which commits fire what: ``transition`` every committed step of a run (a retry
included: ``outcome="retry"``); ``run_finished`` a run ending (completed, failed,
cancelled or timed_out, by a step's commit, a branch failing its run, or beat);
``group_finished`` a Parallel or Map group whose branches are all done (its join is
due) or that failed its run.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from leaseflow import errors, logs, metrics
from leaseflow.fsm import registry

Kind = Literal["transition", "run_finished", "group_finished"]
KINDS: tuple[Kind, ...] = ("transition", "run_finished", "group_finished")
#: Calls waiting for the hook thread, at most; more are dropped (and counted).
QUEUE_SIZE = 10_000
#: A failing or dropped hook is logged at most once per this many seconds (each counted).
LOG_EVERY = 10.0


@dataclass(frozen=True, slots=True)
class Event:
    """What a hook is told: one commit of one run."""

    kind: Kind
    run_id: str
    workflow: str
    version: int
    state: str  # the state that committed (a branch's, for a group)
    next_state: str | None  # where the run goes (None: it stays, or it ended)
    outcome: str  # the step's outcome (lf_steps.outcome), or the group's status
    status: str  # the run's status after the commit
    step_seq: int | None
    error_code: str | None
    at: datetime  # when the commit was seen (this process's clock, UTC)
    group_id: int | None = None


Hook = Callable[[Event], Any]
_global: dict[str, list[Hook]] = {kind: [] for kind in KINDS}


def on(kind: Kind, fn: Hook | None = None) -> Any:
    """Call ``fn(event)`` after every ``kind`` commit of every workflow; returns ``fn``
    (``@hooks.on("run_finished")`` works as a decorator too)."""
    if kind not in KINDS:
        raise errors.ConfigurationError(f"unknown hook {kind!r}: one of {', '.join(KINDS)}")
    if fn is None:
        return lambda f: on(kind, f)
    _global[kind].append(fn)
    return fn


def clear() -> None:
    """Forget every global hook (tests)."""
    for hooks in _global.values():
        hooks.clear()


def _hooks_of(kind: Kind, workflow: str, version: int) -> list[Hook]:
    found = list(_global[kind])
    with contextlib.suppress(errors.UnknownWorkflow):
        found += registry.get(workflow, version).hooks.get(kind, ())
    return found


class Dispatcher:
    """A bounded queue of hook calls and the one thread that runs them (per process:
    a forked child starts a thread of its own on its first call)."""

    def __init__(self, size: int = QUEUE_SIZE) -> None:
        self._size = size
        self._queue: queue.Queue[tuple[list[Hook], Event]] = queue.Queue(size)
        self._pid = 0
        self._lock = threading.Lock()
        self._last_log: dict[tuple[str, str], float] = {}

    def submit(self, hooks: list[Hook], event: Event) -> None:
        self._ensure_thread()
        try:
            self._queue.put_nowait((hooks, event))
        except queue.Full:
            metrics.HOOKS_DROPPED.labels(event.kind).inc()
            if self._may_log(event.kind, "dropped"):
                logs.warning("hook_dropped", hook=event.kind, run_id=event.run_id, queue=self._size)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued call ran; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():  # first call, or a forked child
                self._queue = queue.Queue(self._size)
                threading.Thread(target=self._loop, name="leaseflow-hooks", daemon=True).start()
                self._pid = os.getpid()

    def _loop(self) -> None:
        jobs = self._queue
        loop = asyncio.new_event_loop()
        while True:
            hooks, event = jobs.get()
            try:
                self._run(hooks, event, loop)
            finally:
                jobs.task_done()

    def _run(self, hooks: Iterable[Hook], event: Event, loop: asyncio.AbstractEventLoop) -> None:
        for fn in hooks:
            try:
                result = fn(event)
                if inspect.isawaitable(result):
                    loop.run_until_complete(result)
            except Exception as exc:  # a hook never changes a run: logged and counted
                metrics.HOOK_ERRORS.labels(event.kind).inc()
                name = getattr(fn, "__qualname__", repr(fn))
                if self._may_log(event.kind, name):
                    logs.warning(
                        "hook_failed",
                        hook=event.kind,
                        function=name,
                        run_id=event.run_id,
                        workflow=event.workflow,
                        state=event.state,
                        step_seq=event.step_seq,
                        error=f"{type(exc).__name__}: {exc}",
                    )

    def _may_log(self, kind: str, what: str) -> bool:
        """At most one line per hook and cause every ``LOG_EVERY`` s: a hook failing on
        every commit must not flood the log (every failure is counted)."""
        now = time.monotonic()
        last = self._last_log.get((kind, what))
        if last is not None and now - last < LOG_EVERY:
            return False
        self._last_log[(kind, what)] = now
        return True


dispatcher = Dispatcher()


def _after_fork() -> None:
    """A forked child (a prefork pool process) starts afresh: no thread, a free lock."""
    dispatcher._pid, dispatcher._lock = 0, threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def emit(
    kind: Kind,
    *,
    run_id: str,
    workflow: str,
    version: int,
    state: str,
    outcome: str,
    status: str,
    next_state: str | None = None,
    step_seq: int | None = None,
    error_code: str | None = None,
    group_id: int | None = None,
) -> None:
    """Hand the hooks of ``kind`` one committed event (a no-op when none listens)."""
    hooks = _hooks_of(kind, workflow, version)
    if not hooks:
        return
    event = Event(
        kind,
        run_id,
        workflow,
        version,
        state,
        next_state,
        outcome,
        status,
        step_seq,
        error_code,
        datetime.now(UTC),
        group_id,
    )
    with contextlib.suppress(Exception):  # nothing a hook does reaches the engine
        dispatcher.submit(hooks, event)


def flush(timeout: float = 30.0) -> bool:
    """Wait until this process's queued hook calls ran (tests, ``leaseflow.testing``)."""
    return dispatcher.flush(timeout)
