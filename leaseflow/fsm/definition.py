"""Declaring a workflow: ``Workflow`` and its ``@wf.state`` decorator."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from leaseflow import errors
from leaseflow.fsm import retry as retry_mod
from leaseflow.fsm import validation

#: A state returns an outcome (a state name, Next, Complete, ...); a branch a JSON value.
StateFn = Callable[[Any], Any]

#: A lifecycle hook: called with a ``leaseflow.hooks.Event`` after a commit.
HookFn = TypeVar("HookFn", bound=Callable[[Any], Any])

#: The pseudo source state of the edge that enters a run's initial state.
START = ""


@dataclass(frozen=True)
class StateSpec:
    """One declared state of a workflow."""

    name: str
    fn: StateFn
    initial: bool = False
    to: tuple[str, ...] = ()
    retry: retry_mod.Retry = field(default=retry_mod.DEFAULT_RETRY)
    on_error: str | None = None
    queue: str | None = None
    timeout: float | None = None
    branch: bool = False
    inline: bool = False
    branches: tuple[str, ...] = ()  # the branch states a fork of this state may run
    end: str | None = None  # "completed" | "failed": the only way this state ends a run
    lock: str | None = None  # a resource lock key template, formatted from the context
    hold_lock_until: str | None = None  # the state whose commit releases the lock

    @property
    def final(self) -> bool:
        """A state with no outgoing edge must end the run (Complete or Failed)."""
        return not self.branch and not self.to and self.on_error is None

    @property
    def targets(self) -> tuple[str, ...]:
        """Every state this one may move to, ``on_error`` included."""
        if self.on_error is not None and self.on_error not in self.to:
            return (*self.to, self.on_error)
        return self.to


class Workflow:
    """A workflow: a named, versioned finite-state machine over a pydantic context.

    >>> wf = Workflow("greet", context=MyContext)
    >>> @wf.state(initial=True, to=["done"])
    ... def hello(ctx): return "done"
    """

    def __init__(
        self,
        name: str,
        *,
        context: type[BaseModel],
        version: int = 1,
        context_version: int = 1,
        run_timeout: float | None = None,
        regather: str | None = None,
        register: bool = True,
    ) -> None:
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise errors.InvalidDefinition(
                name or "<unnamed>", {"<workflow>": ["name must be letters, digits, _ or -"]}
            )
        if not (isinstance(context, type) and issubclass(context, BaseModel)):
            raise errors.InvalidDefinition(
                name, {"<workflow>": ["context must be a pydantic BaseModel subclass"]}
            )
        if version < 1 or context_version < 1:
            raise errors.InvalidDefinition(
                name, {"<workflow>": ["version and context_version start at 1"]}
            )
        if run_timeout is not None and not run_timeout > 0:
            raise errors.InvalidDefinition(name, {"<workflow>": ["run_timeout must be > 0"]})
        self.name = name
        #: Seconds from a run's start (or re-drive) after which it ends ``timed_out``.
        self.run_timeout = None if run_timeout is None else float(run_timeout)
        self.context = context
        #: The state a run goes to when its checkpoint is of an older context version
        #: with no upcaster path: it rebuilds the context from the run's input.
        self.regather = regather
        #: ``{from_version: fn}``: each upgrades a checkpoint's data by one version.
        self.upcasters: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
        self.version = version
        self.context_version = context_version
        self._states: dict[str, StateSpec] = {}
        self._duplicates: list[str] = []
        self._validated = False
        self._lock = threading.Lock()
        #: Lifecycle hooks by kind (``on_transition`` ...), run by ``leaseflow.hooks``.
        self.hooks: dict[str, list[Callable[[Any], Any]]] = {}
        if register:
            from leaseflow.fsm import registry

            registry.register(self)

    def __repr__(self) -> str:
        return f"<Workflow {self.name} v{self.version}: {len(self._states)} states>"

    def state(
        self,
        *,
        initial: bool = False,
        to: Iterable[str] = (),
        retry: retry_mod.Retry | None = None,
        on_error: str | None = None,
        queue: str | None = None,
        timeout: float | None = None,
        branch: bool = False,
        inline: bool = False,
        branches: Iterable[str] = (),
        end: str | None = None,
        lock: str | None = None,
        hold_lock_until: str | None = None,
        name: str | None = None,
    ) -> Callable[[StateFn], StateFn]:
        """Declare the decorated function as a state of this workflow.

        ``branch=True`` declares a branch of a ``Parallel`` or ``Map``: it returns a
        JSON value (its result) instead of a next state, and is never a target.

        ``inline=True`` lets this state run in the same Celery task as the state that
        moved to it (inline continuation): the commit of the previous state hands the
        lease straight to the running worker, so there is no claim and no broker hop.
        It still gets its own lease token, step-log row, heartbeat and retries. A state
        is inlined only when entered without delay from a state on the same queue,
        neither of them has ``timeout=`` (a task's time limit is its first state's),
        and the task's inline budget (``LEASEFLOW_INLINE_MAX_STATES``,
        ``LEASEFLOW_INLINE_MAX_SECONDS``) is not spent; otherwise it is published as
        usual.

        ``branches=[...]`` (a forking state) lists the branch states its ``Parallel``
        or ``Map`` may run; a fork naming another fails the run with
        ``E-ILLEGAL-TRANSITION``, and ``leaseflow graph`` draws fork -> branch -> join
        edges (the join when ``to=`` names one state). Without it any branch state
        may run, and the graph cannot tell which.

        ``end="completed"`` or ``end="failed"`` (a state with no ``to=``) declares how
        it ends the run: returning the other one (``Failed`` from a ``"completed"``
        end, ``Complete`` from a ``"failed"`` one) fails the run with
        ``E-ILLEGAL-TRANSITION``, and the graph marks failed ends apart. Exceptions
        are handled as in any state (retry, ``on_error``, ``E-STATE-ERROR``).

        ``lock="vectordb:{tenant}"`` makes the state hold a resource lock while it runs:
        the key is formatted from the context's fields (checked against the context
        model now), and taken in the same transaction as the claim. A claim whose lock
        is held elsewhere claims nothing: the run stays pending and is tried again
        shortly, with no attempt spent. The lock is released in the state's commit, or
        with ``hold_lock_until="other"`` in the commit of that later state (the states
        in between hold it too), or whenever the run ends. It is leased with the run
        (the heartbeat extends it, the sweeper frees it once expired), and each
        acquisition of a key gets a higher fence, ``ctx.lock_token``, for fencing writes
        to the resource. A run holds one lock at a time.
        """
        if isinstance(to, str):
            to = (to,)
        targets = tuple(to)
        forks = (branches,) if isinstance(branches, str) else tuple(branches)

        def decorate(fn: StateFn) -> StateFn:
            spec = StateSpec(
                name=name or fn.__name__,
                fn=fn,
                initial=initial,
                to=targets,
                retry=retry or retry_mod.DEFAULT_RETRY,
                on_error=on_error,
                queue=queue,
                timeout=timeout,
                branch=branch,
                inline=inline,
                branches=forks,
                end=end,
                lock=lock,
                hold_lock_until=hold_lock_until,
            )
            with self._lock:
                if spec.name in self._states:
                    self._duplicates.append(spec.name)
                self._states[spec.name] = spec
                self._validated = False
            from leaseflow.fsm import registry

            registry.state_added(self, spec)
            return fn

        return decorate

    def on_transition(self, fn: HookFn) -> HookFn:
        """Call ``fn(event)`` after each committed step of a run (``leaseflow.hooks``)."""
        return self._hook("transition", fn)

    def on_run_finished(self, fn: HookFn) -> HookFn:
        """Call ``fn(event)`` after a run of this workflow ended."""
        return self._hook("run_finished", fn)

    def on_group_finished(self, fn: HookFn) -> HookFn:
        """Call ``fn(event)`` after a Parallel or Map group's branches are all done."""
        return self._hook("group_finished", fn)

    def _hook(self, kind: str, fn: HookFn) -> HookFn:
        self.hooks.setdefault(kind, []).append(fn)
        return fn

    def upcaster(
        self, *, from_version: int
    ) -> Callable[[Callable[[dict[str, Any]], dict[str, Any]]], Callable[..., Any]]:
        """Declare ``fn(data) -> data`` upgrading a checkpoint's context from
        ``from_version`` to the next one. A run loading an older checkpoint chains them up
        to ``context_version``, then validates the result with the context model; with
        no path it goes to ``regather=`` (if declared) or fails ``E-CHECKPOINT-STALE``."""

        def decorate(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[..., Any]:
            if from_version in self.upcasters:
                self._duplicates.append(f"<upcaster from version {from_version}>")
            self.upcasters[from_version] = fn
            self._validated = False
            return fn

        return decorate

    # -- reading the definition ---------------------------------------------------

    @property
    def states(self) -> dict[str, StateSpec]:
        return dict(self._states)

    def spec(self, state: str) -> StateSpec:
        try:
            return self._states[state]
        except KeyError:
            raise errors.UnknownState(self.name, state) from None

    @property
    def initial(self) -> StateSpec:
        self.validate()
        return next(s for s in self._states.values() if s.initial)

    def edges(self) -> list[tuple[str, str]]:
        """Every legal (from, to) pair, the entry edge ``("", initial)`` first."""
        pairs = [(START, self.initial.name)]
        for spec in self._states.values():
            pairs.extend((spec.name, target) for target in spec.targets)
        if self.regather is not None:  # every state may be sent to re-gather its context
            pairs.extend(
                (spec.name, self.regather)
                for spec in self._states.values()
                if not spec.branch and (spec.name, self.regather) not in pairs
            )
        return pairs

    def validate(self) -> Workflow:
        """Check the whole definition; raise one ``InvalidDefinition`` naming every fault."""
        if self._validated:
            return self
        roots = () if self.regather is None else (self.regather,)
        problems = validation.problems(
            self._states, self._duplicates, context=self.context, roots=roots
        )
        upgrade = validation.upgrade_problems(
            self.upcasters, self.context_version, self.regather, self._states
        )
        if upgrade:
            problems.setdefault(validation.WORKFLOW, []).extend(upgrade)
        if problems:
            raise errors.InvalidDefinition(self.name, problems)
        self._validated = True
        return self

    def task_name(self, state: str) -> str:
        """The Celery task name of a state: ``leaseflow.<workflow>.<state>``."""
        return f"leaseflow.{self.name}.{state}"
