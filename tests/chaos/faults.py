"""The fault catalogue of the chaos suite (``/work/shared/FAULTS.md``), as data.

A :class:`Fault` says when to strike (``trigger``: polled until it returns a target),
how (``inject``), for how long (``hold_s``) and how to heal. Adding a fault is one
entry in :data:`FAULTS`; the harness runs each entry as one scenario.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from leaseflow.runner import Dispatch
from leaseflow.tasks import dispatch
from tests.chaos.harness import LEASE_TTL, Busy, Harness, gone, signal_pid, stopped
from tests.helpers import eventually

FAULTPOINT_KILL = "after_commit_before_enqueue=kill"


def _nothing(h: Harness, token: Any) -> None:
    return None


def _no_check(h: Harness) -> list[str]:
    return []


def slow_state_claimed(h: Harness) -> Busy | None:
    """A worker that has just claimed the slow state: it is mid-state for another second."""
    return h.busy(state="slow", fresh=0.5)


@dataclass(frozen=True)
class Fault:
    id: str
    title: str
    inject: Callable[[Harness, Any], Any]  # (harness, trigger's target) -> heal's token
    heal: Callable[[Harness, Any], None] = _nothing
    hold_s: float = 0.0  # how long the fault lasts before it is healed
    fenced: bool = False  # a zombie fault: at least one commit must be refused (I4)
    beats: int = 1  # beat processes from the start
    trigger: Callable[[Harness], Any] = slow_state_claimed
    check: Callable[[Harness], list[str]] = _no_check  # extra, fault-specific problems
    xfail: str | None = None  # an engine bug this scenario reproduces (strict xfail)


# -- F-1, F-2, F-3: crashes and shutdowns ----------------------------------------------------


def kill_worker(h: Harness, busy: Busy) -> str:
    """``kill -9 $MAIN $(pgrep -P $MAIN)``."""
    busy.worker.kill()
    return busy.slot


def restart(h: Harness, slot: str) -> None:
    h.restart_worker(slot)


def kill_child(h: Harness, busy: Busy) -> Busy:
    signal_pid(busy.pid, signal.SIGKILL)
    eventually(lambda: gone(busy.pid), timeout=10, message=f"pool child {busy.pid} gone")
    return busy


def child_replaced(h: Harness, busy: Busy) -> None:
    """Heal of F-2: the pool has forked a replacement child."""
    eventually(
        lambda: len([p for p in busy.worker.children() if not gone(p)]) == h.concurrency,
        timeout=20,
        message=f"{busy.worker.name} back to {h.concurrency} pool children",
    )


def warm_shutdown(h: Harness, busy: Busy) -> str:
    """SIGTERM to the main process: finish the running states, then exit."""
    signal_pid(busy.worker.pid, signal.SIGTERM)
    return busy.slot


def restart_after_exit(h: Harness, slot: str) -> None:
    worker = h.workers[slot]
    eventually(
        lambda: worker.proc.poll() is not None,
        timeout=30,
        message=f"{worker.name} finished its warm shutdown",
    )
    h.restart_worker(slot)


# -- F-4: a zombie ---------------------------------------------------------------------------


def freeze(h: Harness, busy: Busy) -> Busy:
    busy.worker.signal_all(signal.SIGSTOP)
    eventually(lambda: stopped(busy.worker), timeout=5, message=f"{busy.worker.name} stopped")
    return busy


def thaw(h: Harness, busy: Busy) -> None:
    busy.worker.signal_all(signal.SIGCONT)


# -- F-5: the broker loses everything ----------------------------------------------------------


def redis_down(h: Harness, busy: Any) -> None:
    h.redis.shutdown_nosave()


def redis_up(h: Harness, token: Any) -> None:
    h.restart_redis()


# -- F-7: database connections killed ----------------------------------------------------------


def terminate_worker_backends(h: Harness, busy: Any) -> int:
    row = h.db.execute(
        """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
            WHERE datname = current_database() AND application_name LIKE 'leaseflow-worker%'"""
    ).fetchone()
    return int(row[0])


# -- F-11: database time jumps ahead ------------------------------------------------------------


def clock_jump(h: Harness, busy: Any) -> None:
    h.db.execute(
        "UPDATE lf_runs SET lease_expires_at = now() - interval '1 second' WHERE status = 'running'"
    )
    h.db.execute(
        "UPDATE lf_branches SET lease_expires_at = now() - interval '1 second' "
        "WHERE status = 'running'"
    )


# -- F-12: duplicated messages -------------------------------------------------------------------


def duplicate_messages(h: Harness, busy: Any, copies: int = 2) -> int:
    """Publish again the current message of every active run and branch, same task id."""
    runs = h.db.execute(
        """SELECT id::text, workflow, state, step_seq FROM lf_runs
            WHERE status IN ('pending', 'running')"""
    ).fetchall()
    branches = h.db.execute(
        """SELECT b.run_id::text, r.workflow, b.state, b.group_id, b.idx
             FROM lf_branches b JOIN lf_runs r ON r.id = b.run_id
            WHERE b.status IN ('pending', 'running')"""
    ).fetchall()
    messages = [Dispatch(run_id, wf, state, seq) for run_id, wf, state, seq in runs]
    messages += [
        Dispatch(run_id, wf, state, 0, branch=(group_id, idx))
        for run_id, wf, state, group_id, idx in branches
    ]
    for _ in range(copies):
        for message in messages:
            dispatch.publish(h.client.app, message)
    return len(messages) * copies


# -- F-13: two beats ----------------------------------------------------------------------------


def second_beat_and_crash(h: Harness, busy: Busy) -> Busy:
    """Start a second beat, and SIGKILL a pool child so both reapers have an expiry."""
    h.start_beat()
    return kill_child(h, busy)


def both_beats_reaped(h: Harness) -> list[str]:
    sent = "Sending due task leaseflow-reaper"
    return [f"{b.name} never sent the reaper" for b in h.beats if sent not in b.log()]


# -- F-20: killed between commit and publish ------------------------------------------------------


def arm_commit_kill(h: Harness, busy: Busy) -> str:
    """Replace the worker by one whose pool children SIGKILL themselves after a commit."""
    worker = h.restart_worker(busy.slot, faultpoints=FAULTPOINT_KILL)
    worker.wait_log(f"fault point {FAULTPOINT_KILL.replace('=', ': ')}", timeout=30)
    return busy.slot


def commit_kill_fired(h: Harness) -> list[str]:
    line = f"fault point {FAULTPOINT_KILL.replace('=', ': ')}"
    if any(line in p.log() for p in h.started):
        return []
    return ["the fault point after_commit_before_enqueue never fired"]


FAULTS: dict[str, Fault] = {
    f.id: f
    for f in [
        Fault("F-1", "kill -9 of a whole worker, restarted", kill_worker, restart),
        Fault("F-2", "kill -9 of one pool child", kill_child, child_replaced),
        Fault(
            "F-3", "SIGTERM (warm shutdown) mid-state, restarted", warm_shutdown, restart_after_exit
        ),
        Fault(
            "F-4",
            "SIGSTOP past the lease TTL, then SIGCONT (zombie)",
            freeze,
            thaw,
            hold_s=LEASE_TTL * 1.5,
            fenced=True,
        ),
        Fault("F-5", "Redis restarted without persistence", redis_down, redis_up, hold_s=1.0),
        Fault("F-7", "pg_terminate_backend of the worker connections", terminate_worker_backends),
        Fault("F-11", "database clock jump past every lease", clock_jump, fenced=True),
        Fault("F-12", "every in-flight message duplicated", duplicate_messages),
        Fault(
            "F-13",
            "a second beat (and a pool child killed for the reapers)",
            second_beat_and_crash,
            child_replaced,
            check=both_beats_reaped,
        ),
        Fault(
            "F-20",
            "after_commit_before_enqueue=kill on one worker, restarted clean",
            arm_commit_kill,
            restart,
            check=commit_kill_fired,
        ),
    ]
}
