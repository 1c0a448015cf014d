"""Render a workflow's state graph as Mermaid or Graphviz dot.

Drawn from the declaration only, so a graph shows what the definition can tell:
the ``to=`` and ``on_error=`` edges; fork -> branch edges of a state that declares
``branches=``, and branch -> join edges when that state's ``to=`` names one state
(the join must be in ``to=``); the end of a state with no ``to=``, marked Complete
or Failed when the state declares ``end=`` (plain otherwise: either may happen).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leaseflow.fsm.definition import StateSpec, Workflow

FORMATS = ("mermaid", "dot")
#: How a declared end is labelled.
END_LABELS = {"completed": "Complete", "failed": "Failed"}


def render(wf: Workflow, fmt: str = "mermaid", *, highlight: str | None = None) -> str:
    wf.validate()
    if fmt == "mermaid":
        return _mermaid(wf, highlight)
    if fmt == "dot":
        return _dot(wf, highlight)
    raise ValueError(f"unknown graph format {fmt!r}; choose one of {', '.join(FORMATS)}")


def ends(spec: StateSpec) -> bool:
    """The state ends the run when it returns (it has no ``to=``)."""
    return not spec.branch and not spec.to


def fork_edges(wf: Workflow) -> list[tuple[str, str, str]]:
    """``(source, target, "fork" | "join")`` edges known from ``branches=`` declarations."""
    out: list[tuple[str, str, str]] = []
    for spec in wf.states.values():
        join = spec.to[0] if len(spec.to) == 1 else None
        for branch in dict.fromkeys(spec.branches):
            out.append((spec.name, branch, "fork"))
            if join is not None:
                out.append((branch, join, "join"))
    return list(dict.fromkeys(out))


def _mermaid(wf: Workflow, highlight: str | None) -> str:
    lines = ["stateDiagram-v2", f"    %% {wf.name} v{wf.version}"]
    lines.append(f"    [*] --> {wf.initial.name}")
    failed: list[str] = []
    for spec in wf.states.values():
        for target in spec.to:
            lines.append(f"    {spec.name} --> {target}")
        if spec.on_error is not None and spec.on_error not in spec.to:
            lines.append(f"    {spec.name} --> {spec.on_error}: on_error")
        if ends(spec):
            label = END_LABELS.get(spec.end or "")
            lines.append(f"    {spec.name} --> [*]" + (f": {label}" if label else ""))
            if spec.end == "failed":
                failed.append(spec.name)
        if spec.branch:  # run by a Parallel/Map, never entered by a to= edge
            lines.append(f"    {spec.name}: {spec.name} (branch)")
    for source, target, kind in fork_edges(wf):
        lines.append(f"    {source} --> {target}: {kind}")
    if failed:
        lines.append("    classDef failed_end stroke:#b91c1c,stroke-width:2px,color:#b91c1c")
        lines.append(f"    class {','.join(failed)} failed_end")
    if highlight is not None:
        lines.append("    classDef current fill:#fde68a,stroke:#b45309,stroke-width:2px")
        lines.append(f"    class {highlight} current")
    return "\n".join(lines) + "\n"


def _dot(wf: Workflow, highlight: str | None) -> str:
    lines = [f'digraph "{wf.name}_v{wf.version}" {{', "    rankdir=LR;"]
    lines.append('    "__start__" [shape=point];')
    for spec in wf.states.values():
        if spec.branch:  # run by a Parallel/Map, never entered by a to= edge
            lines.append(
                f'    "{spec.name}" [shape=box, style=dashed, label="{spec.name} (branch)"];'
            )
            continue
        if spec.end == "failed":
            attrs = ["shape=doubleoctagon", 'color="#b91c1c"']
        else:
            attrs = ["shape=doublecircle" if ends(spec) else "shape=box"]
        if spec.name == highlight:
            attrs += ['style="rounded,filled"', 'fillcolor="#fde68a"']
        else:
            attrs.append("style=rounded")
        lines.append(f'    "{spec.name}" [{", ".join(attrs)}];')
    lines.append(f'    "__start__" -> "{wf.initial.name}";')
    for spec in wf.states.values():
        for target in spec.to:
            lines.append(f'    "{spec.name}" -> "{target}";')
        if spec.on_error is not None and spec.on_error not in spec.to:
            lines.append(
                f'    "{spec.name}" -> "{spec.on_error}" [style=dashed, label="on_error"];'
            )
    for source, target, kind in fork_edges(wf):
        lines.append(f'    "{source}" -> "{target}" [style=dashed, label="{kind}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"
