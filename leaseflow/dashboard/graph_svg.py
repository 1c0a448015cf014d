"""A workflow's state graph as inline SVG, laid out here (no JavaScript library).

States stand in columns by their longest distance from the entry (edges that go
back are drawn as arcs below), ordered in a column by their predecessors' places.
A run's page marks the states and edges its steps visited and highlights its
current state; the page's CSS colours them by class.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from markupsafe import Markup, escape

from leaseflow.fsm import graph
from leaseflow.fsm.definition import Workflow

START, END = "[start]", "[end]"
NODE_H, COL_GAP, ROW_GAP, PAD, ARC = 34, 64, 18, 16, 34


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    kind: str  # to | error | fork | join | end


@dataclass
class Box:
    name: str
    rank: int
    x: float = 0.0
    y: float = 0.0
    w: float = 0.0
    h: float = NODE_H

    @property
    def mid_y(self) -> float:
        return self.y + self.h / 2


def edges_of(wf: Workflow) -> list[Edge]:
    """The declared edges, the entry's and the ends' included."""
    found = [Edge(START, wf.initial.name, "to")]
    for spec in wf.states.values():
        found += [Edge(spec.name, target, "to") for target in spec.to]
        if spec.on_error is not None and spec.on_error not in spec.to:
            found.append(Edge(spec.name, spec.on_error, "error"))
        if graph.ends(spec):
            found.append(Edge(spec.name, END, "failed" if spec.end == "failed" else "end"))
    found += [Edge(a, b, kind) for a, b, kind in graph.fork_edges(wf)]
    return list(dict.fromkeys(found))


def _ranks(names: list[str], edges: list[Edge]) -> tuple[dict[str, int], set[Edge]]:
    """Longest distance from the entry over forward edges, and the back edges."""
    out: dict[str, list[Edge]] = {name: [] for name in names}
    for edge in edges:
        out[edge.source].append(edge)
    back: set[Edge] = set()
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done

    def visit(name: str) -> None:  # recursive: a workflow has tens of states, not thousands
        state[name] = 1
        for edge in out[name]:
            if state.get(edge.target) == 1:
                back.add(edge)
            elif edge.target not in state:
                visit(edge.target)
        state[name] = 2
        order.append(name)

    for name in names:
        if name not in state:
            visit(name)
    rank = dict.fromkeys(names, 0)
    for name in reversed(order):  # a topological order of the forward edges
        for edge in out[name]:
            if edge not in back and edge.target != END:
                rank[edge.target] = max(rank[edge.target], rank[name] + 1)
    for name in names:  # a branch no declaration forks to: beside the entry's successors
        if name != START and rank[name] == 0:
            rank[name] = 1
    rank[END] = max(rank.values()) + 1
    return rank, back


Extra = Iterable[tuple[str, str, str]]


def layout(
    wf: Workflow, extra: Extra = ()
) -> tuple[dict[str, Box], list[Edge], set[Edge], float, float]:
    """Boxes by name, edges (``extra`` ones too: a run's forks), back edges, width and
    height."""
    names = [START, *wf.states, END]
    known = set(names)
    more = [Edge(a, b, kind) for a, b, kind in extra if a in known and b in known]
    edges = list(dict.fromkeys(edges_of(wf) + more))
    rank, back = _ranks(names, edges)
    columns: dict[int, list[str]] = {}
    for name in names:
        columns.setdefault(rank[name], []).append(name)
    place: dict[str, float] = {}
    for r in sorted(columns):  # order a column by its predecessors' mean place
        preds = {
            n: [place[e.source] for e in edges if e.target == n and e.source in place]
            for n in columns[r]
        }
        columns[r].sort(key=lambda n: sum(preds[n]) / len(preds[n]) if preds[n] else 0.0)
        place.update({n: float(i) for i, n in enumerate(columns[r])})
    boxes = {n: Box(n, rank[n]) for n in names}
    for box in boxes.values():
        box.w = NODE_H if box.name in (START, END) else max(84, 8.2 * len(box.name) + 28)
    heights = {r: len(c) * NODE_H + (len(c) - 1) * ROW_GAP for r, c in columns.items()}
    tallest = max(heights.values())
    x = float(PAD)
    for r in sorted(columns):
        width = max(boxes[n].w for n in columns[r])
        y = PAD + (tallest - heights[r]) / 2
        for n in columns[r]:
            box = boxes[n]
            box.x, box.y = x + (width - box.w) / 2, y
            y += NODE_H + ROW_GAP
        x += width + COL_GAP
    height = PAD * 2 + tallest + (ARC + 14 if back else 0)
    return boxes, edges, back, x - COL_GAP + PAD, height


def _path(a: Box, b: Box, is_back: bool, bottom: float) -> tuple[str, float, float]:
    """The SVG path of an edge and its middle point (for a label)."""
    if is_back or b.x <= a.x:
        sx, tx = a.x + a.w / 2, b.x + b.w / 2
        sy, ty, low = a.y + a.h, b.y + b.h, bottom + ARC
        path = f"M{sx:.1f},{sy:.1f} C{sx:.1f},{low:.1f} {tx:.1f},{low:.1f} {tx:.1f},{ty + 2:.1f}"
        return path, (sx + tx) / 2, (sy + ty) / 8 + low * 3 / 4
    sx, sy, tx, ty = a.x + a.w, a.mid_y, b.x - 2, b.mid_y
    dx = (tx - sx) / 2
    path = f"M{sx:.1f},{sy:.1f} C{sx + dx:.1f},{sy:.1f} {tx - dx:.1f},{ty:.1f} {tx:.1f},{ty:.1f}"
    t = 0.3  # the label nearer the source: edges crowd at their targets
    ease = 3 * t * t - 2 * t**3  # the curve's y at t (its x runs evenly)
    return path, sx + (tx - sx) * t, sy + (ty - sy) * ease


def render(
    wf: Workflow,
    *,
    current: str | None = None,
    status: str | None = None,
    visited: Iterable[str] = (),
    taken: Iterable[tuple[str, str]] = (),
    extra: Extra = (),
) -> Markup:
    """The graph as an ``<svg>`` element: ``current`` (with the run's ``status``) is
    highlighted, ``visited`` states and ``taken`` edges are marked; ``extra`` edges
    ``(source, target, "fork" | "join")`` are those a run's groups showed."""
    boxes, edges, back, width, height = layout(wf, extra)
    seen, went = set(visited), set(taken)
    bottom = max(box.y + box.h for box in boxes.values())
    parts = [
        f'<svg class="graph" role="img" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'width="{width:.0f}" height="{height:.0f}" data-workflow="{escape(wf.name)}">',
        f"<title>{escape(wf.name)} v{wf.version}</title>",
        "<defs>",
        *(
            f'<marker id="lf-arrow-{k}" viewBox="0 0 10 10" refX="9" refY="5" '
            f'markerUnits="userSpaceOnUse" markerWidth="9" markerHeight="9" orient="auto">'
            f'<path class="arrow-{k}" d="M0,0 L10,5 L0,10 z"/></marker>'
            for k in ("plain", "taken")
        ),
        "</defs>",
    ]
    for edge in edges:
        a, b = boxes[edge.source], boxes[edge.target]
        path, mx, my = _path(a, b, edge in back, bottom)
        is_taken = (edge.source, edge.target) in went
        cls = f"edge {edge.kind}" + (" taken" if is_taken else "")
        marker = "taken" if is_taken else "plain"
        parts.append(f'<path class="{cls}" d="{path}" marker-end="url(#lf-arrow-{marker})"/>')
        if edge.kind in ("error", "fork", "join", "failed"):
            label = "on_error" if edge.kind == "error" else edge.kind
            parts.append(f'<text class="edge-label" x="{mx:.1f}" y="{my - 4:.1f}">{label}</text>')
    for box in boxes.values():
        parts.append(_node(wf, box, current, status, seen))
    parts.append("</svg>")
    return Markup("".join(parts))


def _node(wf: Workflow, box: Box, current: str | None, status: str | None, seen: set[str]) -> str:
    if box.name in (START, END):
        r = box.h / 2 - (8 if box.name == START else 4)
        cx, cy = box.x + box.w / 2, box.mid_y
        inner = f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r - 5:.1f}"/>' if box.name == END else ""
        cls = "terminal" + (" visited" if box.name in seen else "")
        return (
            f'<g class="node {cls}" data-state="{box.name}"><title>{box.name}</title>'
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}"/>{inner}</g>'
        )
    spec = wf.states[box.name]
    classes = ["node"]
    if spec.branch:
        classes.append("branch")
    if box.name in seen:
        classes.append("visited")
    if box.name == current:
        classes += ["current", f"status-{status or 'unknown'}"]
    name = escape(box.name)
    tip = f"{name}{' (branch)' if spec.branch else ''}{' - current' if box.name == current else ''}"
    return (
        f'<g class="{" ".join(classes)}" data-state="{name}"><title>{tip}</title>'
        f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.w:.1f}" height="{box.h}" rx="8"/>'
        f'<text x="{box.x + box.w / 2:.1f}" y="{box.mid_y + 4:.1f}">{name}</text></g>'
    )
