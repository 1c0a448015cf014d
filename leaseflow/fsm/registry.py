"""The workflows declared in this process, by (name, version)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from leaseflow import errors

if TYPE_CHECKING:
    from leaseflow.fsm.definition import StateSpec, Workflow

StateListener = Callable[["Workflow", "StateSpec"], None]

_lock = threading.RLock()
_workflows: dict[tuple[str, int], Workflow] = {}
_listeners: list[StateListener] = []


def register(wf: Workflow) -> None:
    with _lock:
        existing = _workflows.get((wf.name, wf.version))
        if existing is not None and existing is not wf:
            raise errors.ConfigurationError(
                f"workflow {wf.name!r} version {wf.version} is declared twice in this process; "
                "give the new definition a new version"
            )
        _workflows[(wf.name, wf.version)] = wf
        listeners = list(_listeners)
    for spec in wf.states.values():
        for listener in listeners:
            listener(wf, spec)


def unregister(wf: Workflow) -> None:
    """Forget a workflow (tests that declare throwaway workflows)."""
    with _lock:
        if _workflows.get((wf.name, wf.version)) is wf:
            del _workflows[(wf.name, wf.version)]


def state_added(wf: Workflow, spec: StateSpec) -> None:
    """Tell the listeners of a new state of a registered workflow."""
    with _lock:
        if _workflows.get((wf.name, wf.version)) is not wf:
            return
        listeners = list(_listeners)
    for listener in listeners:
        listener(wf, spec)


def subscribe(listener: StateListener) -> None:
    """Call ``listener(wf, spec)`` for every state declared, past and future."""
    with _lock:
        _listeners.append(listener)
        current = list(_workflows.values())
    for wf in current:
        for spec in wf.states.values():
            listener(wf, spec)


def unsubscribe(listener: StateListener) -> None:
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)


def get(name: str, version: int | None = None) -> Workflow:
    """The workflow ``name`` at ``version``, or its newest version when none is given."""
    with _lock:
        if version is not None:
            wf = _workflows.get((name, version))
        else:
            versions = [w for (n, _), w in _workflows.items() if n == name]
            wf = max(versions, key=lambda w: w.version) if versions else None
        keys = sorted(_workflows) if wf is None else []
    if wf is None:
        # The error lists what is registered: names, or names and versions when asked for one.
        if version is None:
            known = list(dict.fromkeys(n for n, _ in keys))
        else:
            known = [f"{n} v{v}" for n, v in keys]
        raise errors.UnknownWorkflow(name, version, known)
    return wf


def versions(name: str) -> list[int]:
    """The versions of workflow ``name`` declared in this process (oldest first)."""
    with _lock:
        return sorted(v for (n, v) in _workflows if n == name)


def all_workflows() -> list[Workflow]:
    with _lock:
        return sorted(_workflows.values(), key=lambda w: (w.name, w.version))
