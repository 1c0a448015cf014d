"""Waits, signals and the run lifecycle operations, as pure decisions (no I/O, no clock).

A state that returns ``Wait`` parks its run: the commit stores a ``WaitPlan`` (where a
signal sends the run, where a timeout does). A signal, a timeout, a cancel and a
re-drive are then decided here and written by the store in one short transaction
that holds the run's row, so a signal racing a timeout (or a cancel) has one winner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from leaseflow import errors
from leaseflow.fsm import checkpoint
from leaseflow.fsm.definition import StateSpec, Workflow
from leaseflow.fsm.outcomes import Wait
from leaseflow.types import TERMINAL_STATUSES, RunStatus, StepOutcome

#: An event name: letters, digits and ``_ . : -``, starting with a letter or digit.
EVENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,99}")
#: A signal id given by the caller (an idempotency key): printable, at most 200 chars.
SIGNAL_ID = re.compile(r"[\x21-\x7e]{1,200}")


def check_event(event: object) -> str:
    """``event`` if it is a well-formed event name; else ``InvalidSignal``."""
    if not isinstance(event, str) or not EVENT_NAME.fullmatch(event):
        raise errors.InvalidSignal(
            f"event {event!r} is not an event name (1-100 of letters, digits, '_', '.', ':' "
            "or '-', starting with a letter or digit)"
        )
    return event


def check_signal_id(signal_id: object) -> str:
    if not isinstance(signal_id, str) or not SIGNAL_ID.fullmatch(signal_id):
        raise errors.InvalidSignal(
            f"signal id {signal_id!r} must be 1-200 printable ASCII characters, no spaces"
        )
    return signal_id


@dataclass(frozen=True, slots=True)
class WaitPlan:
    """What a waiting run waits for, as stored with it (``lf_runs.wait``)."""

    next: str
    next_attempts: int
    event: str | None = None
    timeout: float | None = None
    on_timeout: str | None = None
    timeout_attempts: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "next": self.next,
            "next_attempts": self.next_attempts,
            "event": self.event,
            "timeout": self.timeout,
            "on_timeout": self.on_timeout,
            "timeout_attempts": self.timeout_attempts,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WaitPlan:
        return cls(
            next=str(data["next"]),
            next_attempts=int(data.get("next_attempts") or 1),
            event=data.get("event"),
            timeout=data.get("timeout"),
            on_timeout=data.get("on_timeout"),
            timeout_attempts=int(data.get("timeout_attempts") or 1),
        )


def plan(wf: Workflow, spec: StateSpec, wait: Wait) -> WaitPlan | str:
    """The plan of ``wait`` returned by ``spec``, or why it is illegal."""
    if wait.event is not None:
        try:
            check_event(wait.event)
        except errors.InvalidSignal as exc:
            return f"state {spec.name!r} returned Wait with an {exc.detail}"
    if wait.timeout is not None and not (
        isinstance(wait.timeout, int | float) and wait.timeout > 0
    ):
        return f"state {spec.name!r} returned Wait with timeout={wait.timeout!r}; it must be > 0"
    if wait.event is None and wait.timeout is None:
        return f"state {spec.name!r} returned Wait with neither event= nor timeout="
    if wait.event is None and wait.on_timeout is not None:
        return (
            f"state {spec.name!r} returned a timer Wait (no event) with on_timeout=: a timer "
            "moves to next= when it ends"
        )
    for role, target in (("next", wait.next), ("on_timeout", wait.on_timeout)):
        if target is not None and target not in spec.to:
            return (
                f"state {spec.name!r} returned Wait({role}={target!r}), which is not in its "
                f"to={list(spec.to)}"
            )
    on_timeout = wf.states[wait.on_timeout] if wait.on_timeout is not None else None
    return WaitPlan(
        next=wait.next,
        next_attempts=wf.states[wait.next].retry.max_attempts,
        event=wait.event,
        timeout=float(wait.timeout) if wait.timeout is not None else None,
        on_timeout=wait.on_timeout,
        timeout_attempts=on_timeout.retry.max_attempts if on_timeout is not None else 1,
    )


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a waiting run goes: ``state`` (pending), or nowhere (it fails)."""

    outcome: str  # StepOutcome.SIGNALLED | StepOutcome.WAIT_TIMEOUT
    status: str  # pending | failed
    state: str | None
    max_attempts: int = 1
    error_code: str | None = None
    error: str | None = None


def on_signal(wait: WaitPlan) -> Resume:
    return Resume(StepOutcome.SIGNALLED, RunStatus.PENDING, wait.next, wait.next_attempts)


def on_timeout(wait: WaitPlan, state: str) -> Resume:
    """A timer ends at ``next``; a wait for an event at ``on_timeout``, else it fails."""
    if wait.event is None:
        return Resume(StepOutcome.WAIT_TIMEOUT, RunStatus.PENDING, wait.next, wait.next_attempts)
    if wait.on_timeout is not None:
        return Resume(
            StepOutcome.WAIT_TIMEOUT, RunStatus.PENDING, wait.on_timeout, wait.timeout_attempts
        )
    reason = f"no signal {wait.event!r} within {wait.timeout:g} s in state {state!r}"
    return Resume(
        StepOutcome.WAIT_TIMEOUT,
        RunStatus.FAILED,
        None,
        error_code=errors.WAIT_TIMEOUT,
        error=reason,
    )


def run_timeout_reason(state: str, status: str) -> str:
    return f"the run passed its deadline (run_timeout) while {status} in state {state!r}"


# -- cancel and re-drive ---------------------------------------------------------------

#: What a cancel does to a run, by its status.
CANCEL_NOW = "cancelled"  # pending or waiting: cancelled at once
CANCEL_REQUESTED = "requested"  # running: the state learns it, its commit cancels the run
CANCEL_NOOP = "finished"  # nothing to cancel


def cancel_action(status: str) -> str:
    if status in TERMINAL_STATUSES:
        return CANCEL_NOOP
    if status == RunStatus.RUNNING:
        return CANCEL_REQUESTED
    return CANCEL_NOW


def cancel_reason(reason: str | None) -> str:
    return f"cancelled: {reason}" if reason else "cancelled"


def redrive_refusal(run_id: str, status: str) -> errors.LeaseflowError | None:
    """Why a run in ``status`` cannot be re-driven (None when it can)."""
    if status == RunStatus.COMPLETED:
        return errors.RunCompleted(run_id)
    if status not in (RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.TIMED_OUT):
        return errors.RunActive(run_id, status)
    return None


def check_signal(
    event: object, payload: Any, signal_id: object, *, limit: int
) -> tuple[str, str | None]:
    """The event and signal id of a signal, checked with its payload before anything is
    written: ``InvalidSignal`` (a malformed name or id, a payload that is no JSON value)
    or ``PayloadTooLarge`` (the payload's JSON over ``limit`` bytes)."""
    name = check_event(event)
    given = None if signal_id is None else check_signal_id(signal_id)
    try:
        checkpoint.dumps(
            payload, what="signal payload", limit=limit, setting="LEASEFLOW_MAX_PAYLOAD_BYTES"
        )
    except errors.UnstorableValue as exc:
        raise errors.InvalidSignal(str(exc)) from exc
    return name, given


def check_priority(priority: object) -> int:
    """A run's priority: an integer from 0 (the default) to 9 (most urgent)."""
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
        raise ValueError(f"priority must be an integer from 0 to 9, not {priority!r}")
    return priority
