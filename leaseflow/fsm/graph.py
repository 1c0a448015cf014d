"""Render a workflow's state graph as Mermaid or Graphviz dot."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leaseflow.fsm.definition import Workflow

FORMATS = ("mermaid", "dot")


def render(wf: Workflow, fmt: str = "mermaid", *, highlight: str | None = None) -> str:
    wf.validate()
    if fmt == "mermaid":
        return _mermaid(wf, highlight)
    if fmt == "dot":
        return _dot(wf, highlight)
    raise ValueError(f"unknown graph format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _mermaid(wf: Workflow, highlight: str | None) -> str:
    lines = ["stateDiagram-v2", f"    %% {wf.name} v{wf.version}"]
    lines.append(f"    [*] --> {wf.initial.name}")
    for spec in wf.states.values():
        for target in spec.to:
            lines.append(f"    {spec.name} --> {target}")
        if spec.on_error is not None and spec.on_error not in spec.to:
            lines.append(f"    {spec.name} --> {spec.on_error}: on_error")
        if spec.final:
            lines.append(f"    {spec.name} --> [*]")
        if spec.branch:  # run by a Parallel/Map, never entered by an edge
            lines.append(f"    {spec.name}: {spec.name} (branch)")
    if highlight is not None:
        lines.append("    classDef current fill:#fde68a,stroke:#b45309,stroke-width:2px")
        lines.append(f"    class {highlight} current")
    return "\n".join(lines) + "\n"


def _dot(wf: Workflow, highlight: str | None) -> str:
    lines = [f'digraph "{wf.name}_v{wf.version}" {{', "    rankdir=LR;"]
    lines.append('    "__start__" [shape=point];')
    for spec in wf.states.values():
        if spec.branch:  # run by a Parallel/Map, never entered by an edge
            lines.append(
                f'    "{spec.name}" [shape=box, style=dashed, label="{spec.name} (branch)"];'
            )
            continue
        attrs = ["shape=doublecircle" if spec.final else "shape=box"]
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
    lines.append("}")
    return "\n".join(lines) + "\n"
