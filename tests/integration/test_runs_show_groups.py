"""``leaseflow runs show`` of a run that forked: its groups and their branches, as
text and as JSON (the CLI in-process, against a real database)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result

from leaseflow import cli as leaseflow_cli
from leaseflow.settings import reset_settings
from tests.integration.test_parallel import drive, start
from tests.workflows import fanout

#: A row of a rich table whose first cell is a number (a step's seq, a branch's index).
ROW = re.compile(r"^│\s*\d+\s*│")


@pytest.fixture
def show(database_url: str, redis_url: str, queue_name: str) -> Iterator[Any]:
    """``leaseflow runs show ...`` in this process, pointed at this test's database."""
    with pytest.MonkeyPatch.context() as env:
        for name in list(os.environ):
            if name.startswith("LEASEFLOW_"):
                env.delenv(name)
        env.setenv("LEASEFLOW_WORKFLOWS", "tests.workflows.fanout")
        env.setenv("LEASEFLOW_DATABASE_URL", database_url)
        env.setenv("LEASEFLOW_BROKER_URL", redis_url)
        env.setenv("LEASEFLOW_DEFAULT_QUEUE", queue_name)
        env.setenv("COLUMNS", "200")  # rich tables: one line per row
        reset_settings()

        def run(*args: str) -> Result:
            result = CliRunner().invoke(leaseflow_cli.main, ["runs", "show", *args])
            assert result.exit_code == 0, (result.output, result.exception)
            return result

        yield run
    reset_settings()


@pytest.fixture
def forked(client: Any, runner: Any) -> str:
    """A completed run whose Parallel of three branches collected one failure."""
    first = start(client, fanout.parallel, {"width": 3, "policy": "collect", "fail_index": 1})
    drive(runner, first)
    run = client.get(first.run_id)
    assert run.status == "completed", run
    return first.run_id


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("│").split("│")]


def test_runs_show_prints_each_group_with_its_branches(show, forked: str, db):
    group_id = db.execute("SELECT id FROM lf_groups WHERE run_id = %s", (forked,)).fetchone()[0]
    # When the run is shown
    out = show(forked).stdout

    # Then after its step log comes its group: kind, id, the forking step, counters,
    # status, join state and failure policy
    title = f"parallel group {group_id} (step 1): 2 done, 1 failed of 3, joined, join 'joined'"
    assert f"{title}, collect" in out, out
    table = out[out.index(title) :]
    # And one row per branch, in index order: its state, status, result or error
    rows = [cells(line) for line in table.splitlines() if ROW.match(line)]
    assert [row[:3] for row in rows] == [
        ["0", "leg", "completed"],
        ["1", "leg", "failed"],
        ["2", "leg", "completed"],
    ], table
    assert json.loads(rows[0][3]) == {"index": 0, "label": "ctx"}
    assert "ValueError: branch 1 is broken" in rows[1][3]
    assert json.loads(rows[2][3]) == {"index": 2, "label": "ctx"}
    # And the step log above it stays the run's own
    steps = [cells(line)[:4] for line in out[: out.index(title)].splitlines() if ROW.match(line)]
    assert steps == [["1", "fork", "1", "fork"], ["2", "joined", "1", "completed"]]


def test_runs_show_json_carries_each_group_with_its_branches(show, forked: str, db):
    group_id = db.execute("SELECT id FROM lf_groups WHERE run_id = %s", (forked,)).fetchone()[0]
    # When the run is shown as JSON
    shown = json.loads(show(forked, "--json").stdout)

    # Then it holds its group with the counters and each branch's outcome
    [group] = shown["groups"]
    branches = group.pop("branches")
    assert group == {
        "id": group_id,
        "kind": "parallel",
        "join_state": "joined",
        "width": 3,
        "done": 2,
        "failed": 1,
        "status": "joined",
        "on_branch_error": "collect",
        "max_concurrency": None,
        "parent_seq": 1,
    }
    assert [(b["idx"], b["state"], b["status"]) for b in branches] == [
        (0, "leg", "completed"),
        (1, "leg", "failed"),
        (2, "leg", "completed"),
    ]
    assert [b["result"] for b in branches] == [
        {"index": 0, "label": "ctx"},
        None,
        {"index": 2, "label": "ctx"},
    ]
    assert "ValueError: branch 1 is broken" in branches[1]["error"]
    # And the output and steps are the run's, the join's output naming the failed branch
    assert shown["output"]["errors"].keys() == {"1"}
    assert [s["state"] for s in shown["steps"]] == ["fork", "joined"]
