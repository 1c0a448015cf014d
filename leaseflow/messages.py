"""The wake-up messages of runs: one small type per message, shared by the client, the
runner, beat and the Celery adapters (which alone turn them into Celery messages).

A message is only a hint that something may be due: the store decides. Its task id
names the step (``<run_id>:<step_seq>``, ``<run_id>:g<group>:<idx>``) so Flower shows
one task per step and a re-published message is recognisably the same one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StateStep:
    """Run ``state`` of ``run_id`` at ``step_seq``: the task's arguments are
    ``(run_id, step_seq)``."""

    run_id: str
    workflow: str
    state: str
    step_seq: int
    countdown: float = 0.0
    priority: int = 0  # the run's priority, 0 (default) to 9 (most urgent)
    version: int | None = None  # the run's workflow version (its state's queue), if known

    @property
    def args(self) -> tuple[str, int]:
        return (self.run_id, self.step_seq)

    @property
    def task_id(self) -> str:
        return f"{self.run_id}:{self.step_seq}"


@dataclass(frozen=True, slots=True)
class BranchStep:
    """Run branch ``idx`` of group ``group_id``: the task's arguments are
    ``(group_id, idx)``."""

    run_id: str
    workflow: str
    state: str
    group_id: int
    idx: int
    countdown: float = 0.0
    priority: int = 0
    version: int | None = None

    @property
    def args(self) -> tuple[int, int]:
        return (self.group_id, self.idx)

    @property
    def task_id(self) -> str:
        return f"{self.run_id}:g{self.group_id}:{self.idx}"


@dataclass(frozen=True, slots=True)
class JoinWake(StateStep):
    """Run the join state of a group that has completed: a ``StateStep`` that a Celery
    chord's body may deliver too, so the branches of a chord do not publish it."""


Message = StateStep | BranchStep | JoinWake


@dataclass(frozen=True, slots=True)
class ForkStart:
    """Start the branches of a new group; ``join`` is the chord body (its wake-up)."""

    group_id: int
    branches: tuple[BranchStep, ...]
    join: JoinWake
    chord: bool  # every branch is released at once: it may run as a Celery chord


@dataclass(frozen=True, slots=True)
class StepResult:
    """What happened to one message: ``result`` is a stable word for logs and tests."""

    result: str  # committed | lease_lost | skipped | deferred
    wakeups: tuple[Message, ...] = ()  # to publish
    outcome: str | None = None
    fork: ForkStart | None = None
    inlined: int = 0  # states run inline after the first, in this call
