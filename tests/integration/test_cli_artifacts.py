"""``leaseflow runs artifact RUN NAME`` writes an artefact's bytes exactly as put;
``runs show`` lists the run's artefacts and the checkpoint sizes of its steps."""

from __future__ import annotations

import json

from leaseflow.client import Client
from tests.integration.test_cli import Cli, bare_cli, cli, failed_cleanly
from tests.integration.test_parallel import drive, start
from tests.workflows.artifacts import BINARY, REPORT, reports

__all__ = ["bare_cli", "cli"]  # the fixtures this module uses


def finished_run(client: Client, runner) -> str:
    first = start(client, reports, {})
    drive(runner, first)
    run = client.get(first.run_id)
    assert (run.status, run.output) == ("completed", {"lines": 2000}), run.error
    return first.run_id


def test_runs_artifact_writes_the_bytes_to_stdout_and_to_a_file(cli: Cli, client, runner, tmp_path):
    run_id = finished_run(client, runner)
    text = cli("runs", "artifact", run_id, "report.txt")
    assert text.exit_code == 0, text.output
    assert text.stdout_bytes == REPORT.encode()
    target = tmp_path / "raw.bin"
    raw = cli("runs", "artifact", run_id, "raw.bin", "--output", str(target))
    assert raw.exit_code == 0 and raw.stdout == ""
    assert target.read_bytes() == BINARY


def test_runs_show_lists_artifacts_and_checkpoint_sizes(cli: Cli, client, runner):
    run_id = finished_run(client, runner)
    shown = cli("runs", "show", run_id, "--json")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert [(a["name"], a["size_bytes"]) for a in data["artifacts"]] == [
        ("raw.bin", len(BINARY)),
        ("report.txt", len(REPORT)),
    ]
    assert all(s["context_bytes"] and s["checkpoint_bytes"] for s in data["steps"])
    table = cli("runs", "show", run_id)
    assert table.exit_code == 0
    assert "2 artifact(s)" in table.stdout and "report.txt" in table.stdout
    assert "B (" in table.stdout  # the step log's "raw -> stored (ratio)" column


def test_an_unknown_artifact_or_run_fails_cleanly(cli: Cli, client, runner):
    run_id = finished_run(client, runner)
    missing = failed_cleanly(cli("runs", "artifact", run_id, "nope"), "E-ARTIFACT-NOT-FOUND")
    assert "'nope'" in missing
    failed_cleanly(
        cli("runs", "artifact", "00000000-0000-4000-8000-000000000000", "x"), "E-RUN-NOT-FOUND"
    )
