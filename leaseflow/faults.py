"""Named fault points, for tests that crash a process at a precise instant.

``LEASEFLOW_FAULTPOINTS="after_commit_before_enqueue=kill"`` arms a point for a
process; actions are ``kill`` (SIGKILL self), ``stop`` (SIGSTOP self), ``raise``,
``exit`` and ``sleep:SECONDS``. A point may be limited to a state with
``name@state=action``. In-process tests arm hooks with :func:`arm`.
Unarmed points cost one dict lookup.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

POINTS = (
    "after_claim",
    "before_commit",
    "after_commit_before_enqueue",
    "during_heartbeat",
    "after_purge_batch",  # retention: a batch of finished runs deleted and committed
)
#: Switches that change what is published, for tests of the repair paths.
SWITCHES = (
    "chord_callback_lost",  # publish a group's header without its chord body
    "chord_disabled",  # publish branches as plain messages even with a result backend
)

_hooks: dict[str, Callable[[dict[str, object]], None]] = {}


class FaultInjected(RuntimeError):
    """Raised by a fault point armed with ``raise``."""


def _parse(spec: str) -> dict[str, str]:
    armed: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        armed[name.strip()] = action.strip() or "raise"
    return armed


_from_env = _parse(os.environ.get("LEASEFLOW_FAULTPOINTS", ""))


def arm(name: str, hook: Callable[[dict[str, object]], None]) -> None:
    """Call ``hook(info)`` whenever point ``name`` is reached in this process."""
    _hooks[name] = hook


def disarm(name: str | None = None) -> None:
    if name is None:
        _hooks.clear()
    else:
        _hooks.pop(name, None)


def armed(name: str) -> bool:
    """Is the switch ``name`` on (``LEASEFLOW_FAULTPOINTS=name=on``, or a hook)?"""
    return name in _hooks or name in _from_env


def point(name: str, **info: object) -> None:
    """Reached by the engine at the named instant."""
    if not _from_env and not _hooks:
        return
    hook = _hooks.get(name)
    if hook is not None:
        hook(info)
    state = info.get("state")
    action = _from_env.get(f"{name}@{state}") or _from_env.get(name)
    if action:
        _act(name, action)


def _act(name: str, action: str) -> None:
    sys.stderr.write(f"leaseflow fault point {name}: {action}\n")
    sys.stderr.flush()
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "exit":
        os._exit(70)
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
    else:
        raise FaultInjected(name)
