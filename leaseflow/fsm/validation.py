"""Validation of a whole workflow definition: every fault, named by state."""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from leaseflow.fsm import locks

if TYPE_CHECKING:
    from pydantic import BaseModel

    from leaseflow.fsm.definition import StateSpec

WORKFLOW = "<workflow>"
#: The values ``end=`` of a state takes: it ends a run by returning Complete, or Failed.
ENDS = ("completed", "failed")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known`` to ``name``, else ``""``."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def problems(
    states: Mapping[str, StateSpec],
    duplicates: Sequence[str] = (),
    *,
    context: type[BaseModel] | None = None,
    roots: Sequence[str] = (),
) -> dict[str, list[str]]:
    """``roots``: states reachable besides the initial one (``regather=``)."""
    """Return ``{state: [problem, ...]}``; empty when the definition is sound."""
    found: dict[str, list[str]] = defaultdict(list)
    for name in duplicates:
        found[name].append("declared more than once")
    if not states:
        found[WORKFLOW].append("declares no state")
        return dict(found)

    initials = [s.name for s in states.values() if s.initial]
    if not initials:
        found[WORKFLOW].append("has no initial state (mark one with initial=True)")
    elif len(initials) > 1:
        for name in initials:
            found[name].append(f"is one of {len(initials)} initial states: {sorted(initials)}")

    branches = {s.name for s in states.values() if s.branch}
    for spec in states.values():
        for target in spec.to:
            if target not in states:
                hint = did_you_mean(target, (n for n in states if n not in branches))
                found[spec.name].append(f"names unknown target {target!r} in to={hint}")
            elif target in branches:
                found[spec.name].append(
                    f"names branch state {target!r} in to= (a branch is never a target; "
                    "return Parallel or Map to run it)"
                )
        if spec.on_error is not None and spec.on_error not in states:
            hint = did_you_mean(spec.on_error, (n for n in states if n not in branches))
            found[spec.name].append(f"names unknown on_error state {spec.on_error!r}{hint}")
        elif spec.on_error in branches:
            found[spec.name].append(f"names branch state {spec.on_error!r} as on_error")
        if spec.timeout is not None and spec.timeout <= 0:
            found[spec.name].append("has a timeout that is not positive")
        if spec.branch and (spec.to or spec.on_error is not None or spec.initial):
            found[spec.name].append(
                "is a branch state: it returns a result, so it takes no to=, on_error= or initial="
            )
        if spec.branch and spec.inline:
            found[spec.name].append(
                "is a branch state: branches run as their own tasks, so it cannot be inline="
            )
        for problem in _fork_and_end_problems(spec, states, branches):
            found[spec.name].append(problem)
        for problem in _lock_problems(spec, states, context):
            found[spec.name].append(problem)
        if spec.inline and spec.timeout is not None:
            found[spec.name].append(
                "has both inline= and timeout=: a state with a time limit runs in its own task"
            )

    flow = {name: spec for name, spec in states.items() if not spec.branch}
    if len(initials) == 1 and initials[0] in flow:
        reachable = _closure([initials[0], *(r for r in roots if r in flow)], flow, forward=True)
        for name in flow:
            if name not in reachable:
                found[name].append(f"is unreachable from the initial state {initials[0]!r}")

    finals = [s.name for s in flow.values() if s.final]
    can_finish = _closure(finals, flow, forward=False)
    for name in flow:
        if name not in can_finish:
            found[name].append("has no path to a final state (one with no to=)")
    return dict(found)


def _fork_and_end_problems(
    spec: StateSpec, states: Mapping[str, StateSpec], branches: set[str]
) -> list[str]:
    """What is wrong with the ``branches=`` and ``end=`` of ``spec``."""
    out: list[str] = []
    for name in spec.branches:
        if name not in states:
            hint = did_you_mean(name, branches)
            out.append(f"names unknown branch state {name!r} in branches={hint}")
        elif name not in branches:
            out.append(
                f"names {name!r} in branches=, which is not a branch state "
                "(declare it with branch=True)"
            )
    if spec.branch and (spec.branches or spec.end is not None):
        out.append("is a branch state: it neither forks (branches=) nor ends a run (end=)")
    elif spec.branches and not spec.to:
        out.append("declares branches= but no to=: a fork's join must be in to=")
    if spec.end is not None and spec.end not in ENDS:
        out.append(f"has end={spec.end!r}; end= is one of {', '.join(map(repr, ENDS))}")
    elif spec.end is not None and spec.to and not spec.branch:
        out.append("declares end= and to=: end= is for a state that ends the run (no to=)")
    return out


def _lock_problems(
    spec: StateSpec, states: Mapping[str, StateSpec], context: type[BaseModel] | None
) -> list[str]:
    """What is wrong with the ``lock=`` and ``hold_lock_until=`` of ``spec``."""
    out: list[str] = []
    if spec.lock is not None:
        if spec.branch:
            out.append("is a branch state: it takes no lock= (lock the state that forks)")
        if spec.inline:
            out.append("has both inline= and lock=: a locked state is claimed with its lock")
        if context is not None:
            out.extend(locks.template_problems(spec.lock, context))
    if spec.hold_lock_until is not None:
        target = states.get(spec.hold_lock_until)
        if spec.lock is None:
            out.append("declares hold_lock_until= but no lock=")
        elif target is None or target.branch:
            hint = did_you_mean(
                spec.hold_lock_until, (n for n, s in states.items() if not s.branch)
            )
            out.append(f"names unknown state {spec.hold_lock_until!r} in hold_lock_until={hint}")
    return out


def upgrade_problems(
    upcasters: Mapping[int, object],
    context_version: int,
    regather: str | None,
    states: Mapping[str, StateSpec],
) -> list[str]:
    """What is wrong with a workflow's upcasters and ``regather=``."""
    out = [
        f"has an upcaster from context version {v}, which is not below context_version="
        f"{context_version}"
        for v in sorted(upcasters)
        if not 1 <= v < context_version
    ]
    if regather is not None and (regather not in states or states[regather].branch):
        flow = (name for name, spec in states.items() if not spec.branch)
        out.append(f"names unknown state {regather!r} in regather={did_you_mean(regather, flow)}")
    return out


def _closure(start: list[str], states: Mapping[str, StateSpec], *, forward: bool) -> set[str]:
    """States reachable from ``start`` along edges (or against them)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for spec in states.values():
        for target in spec.targets:
            if target in states:
                if forward:
                    edges[spec.name].add(target)
                else:
                    edges[target].add(spec.name)
    seen = set(start)
    stack = list(start)
    while stack:
        for nxt in edges[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen
