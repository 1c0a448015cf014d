"""The dashboard's pure parts: the SVG graph's layout and marks, the runs filters,
durations and the step timeline's bars."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta

from leaseflow.dashboard import graph_svg, views
from leaseflow.store.records import RunRecord, StepRecord
from tests.workflows import basic, fanout, waits

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def node_classes(svg: str) -> dict[str, str]:
    return {m[1]: m[0] for m in re.findall(r'<g class="([^"]*)" data-state="([^"]*)"', svg)}


def test_states_stand_in_columns_by_their_distance_from_the_entry():
    boxes, _edges, back, width, height = graph_svg.layout(waits.approval)
    xs = {name: box.x for name, box in boxes.items()}
    assert xs[graph_svg.START] < xs["draft"] < xs["decide"] < xs["route"] < xs["approved"]
    assert boxes["route"].rank == boxes["expired"].rank  # both one step after decide
    assert boxes[graph_svg.END].x > xs["approved"]
    assert not back
    assert width > 0 and height > 0


def test_an_on_error_edge_is_one_of_the_graphs_edges():
    boxes, edges, _back, _, _ = graph_svg.layout(basic.recovering)
    kinds = {(e.source, e.target): e.kind for e in edges}
    assert kinds[("risky", "fallback")] == "error"
    assert boxes["ok"].rank == boxes["fallback"].rank


def test_the_current_state_is_highlighted_and_the_path_marked():
    svg = graph_svg.render(
        waits.approval,
        current="decide",
        status="waiting",
        visited={graph_svg.START, "draft", "decide"},
        taken={(graph_svg.START, "draft"), ("draft", "decide")},
    )
    classes = node_classes(svg)
    assert classes["decide"] == "node visited current status-waiting"
    assert classes["draft"] == "node visited"
    assert classes["route"] == "node"
    assert svg.count('class="edge to taken"') == 2
    assert svg.startswith("<svg") and svg.endswith("</svg>")


def test_state_names_are_escaped():
    svg = graph_svg.render(basic.linear, current="<s1>")
    assert "<s1>" not in svg


def test_filters_parse_a_time_range_in_utc_and_report_what_is_wrong():
    found = views.Filters.parse({"status": "waiting", "since": "2026-12-05T10:30", "limit": "9"})
    assert found.status == "waiting" and found.limit == 9 and not found.problems
    assert found.since == datetime(2026, 12, 5, 10, 30, tzinfo=UTC)
    assert found.query() == {"status": "waiting", "since": "2026-12-05T10:30"}
    bad = views.Filters.parse({"status": "asleep", "until": "yesterday", "limit": "x"})
    assert len(bad.problems) == 3


def test_durations_read_as_people_say_them():
    assert [views.duration(ms) for ms in (None, 850, 2400, 185_000, 7_440_000)] == [
        "",
        "850 ms",
        "2.4 s",
        "3 min 5 s",
        "2 h 4 min",
    ]


def step(seq: int, state: str, start: float, end: float, outcome: str = "next") -> StepRecord:
    return StepRecord(
        seq=seq,
        state=state,
        attempt=1,
        outcome=outcome,
        next_state=None if outcome == "completed" else "x",
        started_at=T0 + timedelta(seconds=start),
        finished_at=T0 + timedelta(seconds=end),
        duration_ms=int((end - start) * 1000),
        worker="w:1",
        lease_token=None,
        error=None,
    )


def run_with(*steps: StepRecord) -> RunRecord:
    return RunRecord(
        id="r",
        workflow="linear5",
        version=1,
        state=steps[-1].state,
        prev_state=None,
        status="completed",
        step_seq=len(steps),
        attempt=1,
        max_attempts=1,
        lease_owner=None,
        lease_expires_at=None,
        not_before=T0,
        input={},
        output=None,
        error_code=None,
        error=None,
        idempotency_key=None,
        created_at=T0,
        updated_at=T0 + timedelta(seconds=10),
        finished_at=T0 + timedelta(seconds=10),
        steps=steps,
    )


def test_the_timeline_places_each_step_on_the_runs_span():
    rows = views.timeline(run_with(step(1, "s1", 0, 2), step(2, "s2", 5, 10, "completed")))
    assert [(r["left"], r["width"]) for r in rows] == [("0.00", "20.00"), ("50.00", "50.00")]


def test_the_path_is_what_the_steps_took():
    first = dataclasses.replace(step(1, "s1", 0, 1), next_state="s2")
    run = run_with(first, step(2, "s2", 1, 2, "completed"))
    visited, taken = views.path_of(run)
    assert {"s1", "s2", graph_svg.START, graph_svg.END} <= visited
    assert {(graph_svg.START, "s1"), ("s1", "s2"), ("s2", graph_svg.END)} <= taken


def test_a_loop_is_drawn_as_an_arc_below_the_columns():
    from pydantic import BaseModel

    from leaseflow import Complete, Workflow

    class Empty(BaseModel):
        pass

    loop = Workflow("dash_loop", context=Empty, register=False)

    @loop.state(initial=True, to=["check"])
    def poll(ctx):
        return "check"

    @loop.state(to=["poll", "finish"])
    def check(ctx):
        return "finish"

    @loop.state()
    def finish(ctx):
        return Complete()

    boxes, _edges, back, _, height = graph_svg.layout(loop)
    assert [(e.source, e.target) for e in back] == [("check", "poll")]
    assert boxes["poll"].x < boxes["check"].x < boxes["finish"].x
    assert height > max(b.y + b.h for b in boxes.values()) + graph_svg.ARC


def test_a_runs_forks_and_joins_are_drawn_with_its_branches():
    svg = graph_svg.render(
        fanout.parallel, extra=[("fork", "leg", "fork"), ("leg", "joined", "join")]
    )
    assert 'class="edge fork"' in svg and 'class="edge join"' in svg
    assert "node branch" in svg
