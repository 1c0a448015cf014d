"""Plain value types shared by every layer (no I/O)."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.TIMED_OUT}
)


class StepOutcome(StrEnum):
    """What one step (one attempt of one state) ended with, as written to ``lf_steps``."""

    NEXT = "next"  # moved to next_state
    COMPLETED = "completed"  # the run completed
    FAILED = "failed"  # the run failed (Failed outcome, or an error with no retry left)
    RETRY = "retry"  # the state raised and will run again
    FORK = "fork"  # started a Parallel or Map group; the run waits for its join
    LEASE_EXPIRED = "lease_expired"  # written by the reaper
    WAIT = "wait"  # the run waits for a signal or a timer
    SIGNALLED = "signalled"  # a signal resumed the waiting run at next_state
    WAIT_TIMEOUT = "wait_timeout"  # the wait ran out (a timer's end, or a timeout)
    CANCELLED = "cancelled"  # the run was cancelled
    TIMED_OUT = "timed_out"  # the run passed its deadline (run_timeout=)
    REDRIVEN = "redriven"  # a finished run was sent back to pending (client.retry)
    REGATHERED = "regathered"  # a stale checkpoint: the run goes to regather= (no upcaster)
