"""The CLI's errors where no service is needed: one ``error[<code>]: <message>`` on
stderr (a JSON object with ``--json``), exit 2 for usage errors and 1 for the rest;
``worker`` and ``beat`` refuse to start Celery on a bad definition or no workflow."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from pydantic import BaseModel
from rich.console import Console

from leaseflow import Complete, Workflow
from leaseflow import cli as leaseflow_cli
from leaseflow import demo as demo_mod
from leaseflow.fsm import registry
from leaseflow.settings import reset_settings
from leaseflow.tasks import celery_app

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(leaseflow_cli.main, list(args), input=input, prog_name="leaseflow")


def error_of(result: Result, exit_code: int, code: str) -> str:
    """The command failed with ``exit_code`` and ``error[code]: ...`` on stderr alone."""
    assert result.exit_code == exit_code, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert result.stdout == ""
    assert result.stderr.startswith(f"error[{code}]: "), result.stderr
    return result.stderr


def json_error_of(result: Result, exit_code: int) -> dict[str, Any]:
    """With --json: one JSON object on stderr, nothing on stdout."""
    assert result.exit_code == exit_code, (result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    found: dict[str, Any] = json.loads(lines[0])
    assert set(found) == {"code", "message"}
    return found


@pytest.fixture(autouse=True)
def bare_env() -> Iterator[pytest.MonkeyPatch]:
    """Only LEASEFLOW_WORKFLOWS set: no database, no broker."""
    with pytest.MonkeyPatch.context() as env:
        for name in list(os.environ):
            if name.startswith("LEASEFLOW_"):
                env.delenv(name)
        env.setenv("LEASEFLOW_WORKFLOWS", "tests.workflows.basic")
        reset_settings()
        yield env
    reset_settings()


class Empty(BaseModel):
    pass


@pytest.fixture
def invalid_workflow() -> Iterator[Workflow]:
    """A registered workflow whose only transition names a state that does not exist."""
    wf = Workflow("unit_typo_in_to", context=Empty)

    @wf.state(initial=True, to=["finnish"])
    def start(ctx: Any) -> str:
        return "finish"

    @wf.state()
    def finish(ctx: Any) -> Complete:
        return Complete()

    yield wf
    registry.unregister(wf)


@pytest.fixture
def celery_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """What the CLI asks Celery to run, instead of running it."""
    calls: list[list[str]] = []

    def record(argv: list[str]) -> None:
        calls.append(list(argv))

    monkeypatch.setattr(celery_app.get_app(), "worker_main", record)
    monkeypatch.setattr(celery_app.get_app(), "start", record)
    return calls


# -- usage errors -----------------------------------------------------------------------


def test_an_unknown_option_is_a_usage_error_with_a_hint():
    message = error_of(run("start", "linear5", "--bogus"), 2, "E-USAGE")
    assert "No such option '--bogus'" in message
    assert "Try 'leaseflow start --help' for help." in message


def test_malformed_input_json_is_a_usage_error():
    message = error_of(run("start", "linear5", "--input", '{"n": 1'), 2, "E-USAGE")
    assert "'--input'" in message
    assert "not valid JSON" in message


def test_an_unreadable_input_file_is_a_usage_error(tmp_path: Path):
    missing = tmp_path / "missing.json"
    message = error_of(run("start", "linear5", "--input", f"@{missing}"), 2, "E-USAGE")
    assert f"cannot read {missing}: No such file or directory" in message


def test_input_that_is_not_utf8_is_a_usage_error(tmp_path: Path):
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"n": "\xe9"}'.encode("latin-1"))
    assert "is not UTF-8" in error_of(run("start", "linear5", "--input", f"@{latin}"), 2, "E-USAGE")


@pytest.mark.parametrize("how", ["inline", "file", "stdin"])
def test_input_nested_too_deeply_for_the_parser_is_invalid_input(how: str, tmp_path: Path):
    # Given an input nested far deeper than Python's recursion limit
    deep = '{"n": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = tmp_path / "deep.json"
    path.write_text(deep)
    value = {"inline": deep, "file": f"@{path}", "stdin": "-"}[how]
    # When a run is started with it
    result = run("start", "linear5", "--input", value, input=deep if how == "stdin" else None)
    # Then it is refused as invalid input, not with a RecursionError's traceback
    message = error_of(result, 1, "E-CONTEXT-INVALID")
    assert "invalid input for workflow 'linear5': the JSON is nested too deeply" in message


# -- errors with their codes, in prose and in JSON ----------------------------------


def test_an_engine_error_is_printed_with_its_code():
    message = error_of(run("graph", "nope"), 1, "E-UNKNOWN-WORKFLOW")
    assert "unknown workflow 'nope'" in message


def test_a_malformed_environment_is_a_configuration_error(bare_env: pytest.MonkeyPatch):
    bare_env.setenv("LEASEFLOW_LEASE_TTL", "-1")
    reset_settings()
    message = error_of(run("runs", "list"), 1, "E-CONFIG")
    assert "invalid environment:\n  LEASEFLOW_LEASE_TTL: Input should be greater than 0" in message


def test_with_json_an_error_is_a_json_object_on_stderr(bare_env: pytest.MonkeyPatch):
    # A usage error
    found = json_error_of(run("runs", "list", "--json", "--status", "done"), 2)
    assert found["code"] == "E-USAGE"
    assert "'done'" in found["message"]
    # And an error of the engine (here the environment)
    bare_env.setenv("LEASEFLOW_LEASE_TTL", "-1")
    reset_settings()
    found = json_error_of(run("runs", "show", "some-id", "--json"), 1)
    assert found["code"] == "E-CONFIG"
    assert "LEASEFLOW_LEASE_TTL" in found["message"]


def test_help_still_exits_zero():
    result = run("start", "--help")
    assert result.exit_code == 0, result.output
    assert "@FILE reads it from a file, - from stdin" in " ".join(result.stdout.split())


# -- worker and beat refuse to start ------------------------------------------------


def test_worker_refuses_an_invalid_definition_before_celery_starts(
    invalid_workflow: Workflow, celery_calls: list[list[str]]
):
    message = error_of(run("worker"), 1, "E-DEFINITION")
    assert "workflow 'unit_typo_in_to' is invalid" in message
    assert "'finnish'" in message
    assert celery_calls == []


def test_beat_refuses_an_invalid_definition_before_celery_starts(
    invalid_workflow: Workflow, celery_calls: list[list[str]], tmp_path: Path
):
    result = run("beat", "--schedule", str(tmp_path / "schedule"))
    assert "workflow 'unit_typo_in_to' is invalid" in error_of(result, 1, "E-DEFINITION")
    assert celery_calls == []


def test_worker_with_no_workflow_refuses_unless_maintenance_only(
    bare_env: pytest.MonkeyPatch, monkeypatch: pytest.MonkeyPatch, celery_calls: list[list[str]]
):
    # Given no workflow at all
    bare_env.delenv("LEASEFLOW_WORKFLOWS")
    reset_settings()
    monkeypatch.setattr(registry, "all_workflows", list)
    # When a worker is started, it refuses and says what to set
    message = error_of(run("worker"), 1, "E-CONFIG")
    assert "no workflow to serve: LEASEFLOW_WORKFLOWS is not set" in message
    assert "leaseflow worker --maintenance-only" in message
    assert celery_calls == []
    # And with --maintenance-only it serves the beat queue alone
    assert run("worker", "--maintenance-only").exit_code == 0
    assert celery_calls == [["worker", "-Q", "leaseflow.beat", "-l", "INFO"]]


def test_maintenance_only_takes_no_queues(celery_calls: list[list[str]]):
    message = error_of(run("worker", "--maintenance-only", "-Q", "a"), 2, "E-USAGE")
    assert "drop -Q" in message
    assert celery_calls == []


def test_prepare_worker_logs_every_problem_and_exits(
    invalid_workflow: Workflow, caplog: pytest.LogCaptureFixture
):
    # When a worker started by `celery worker` itself prepares, with an invalid definition
    with caplog.at_level(logging.ERROR, logger="leaseflow"), pytest.raises(SystemExit) as exited:
        celery_app.prepare_worker(["leaseflow"])
    # Then it exits (an Exception would be swallowed by Celery's signal dispatch) ...
    assert exited.value.code == 1
    # ... after logging the problem at ERROR
    refused = [r for r in caplog.records if getattr(r, "action", None) == "worker_refused"]
    assert [r.levelno for r in refused] == [logging.ERROR]
    assert "'finnish'" in refused[0].getMessage()


def test_prepare_worker_exits_with_no_workflow_for_a_state_queue(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setattr(registry, "all_workflows", list)
    with caplog.at_level(logging.ERROR, logger="leaseflow"), pytest.raises(SystemExit):
        celery_app.prepare_worker(["leaseflow", "leaseflow.beat"])
    assert "no workflow to serve" in caplog.text


# -- the demo's hints ---------------------------------------------------------------


def test_the_demo_prints_its_hints_unwrapped():
    # Given a demo summary printed on a narrow terminal
    out = StringIO()
    report = demo_mod.DemoReport(
        runs=1, completed=1, run_ids=["0" * 8 + "-0000-0000-0000-" + "0" * 12]
    )
    demo_mod._print(report, Console(file=out, width=40), Path("/tmp"))
    # Then each hint is on one line, as inspect_hints gives it
    lines = [line.strip() for line in out.getvalue().splitlines()]
    for hint in demo_mod.inspect_hints(report.run_ids[0]):
        assert hint in lines


def test_the_demos_graph_hint_runs_as_printed():
    # Given the graph hint, and an environment without any LEASEFLOW_* setting
    hint = next(h for h in demo_mod.inspect_hints("x") if " graph " in h)
    words = shlex.split(hint)
    assignments = [w for w in words if re.fullmatch(r"[A-Z_]+=\S*", w)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEASEFLOW_")}
    env.update(w.split("=", 1) for w in assignments)
    command = words[len(assignments) :]
    assert command[0] == "leaseflow"
    # When it is run in a new process
    code = "import sys; from leaseflow.cli import main; sys.argv[0] = 'leaseflow'; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, *command[1:]],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then it prints the agent workflow's graph
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("stateDiagram-v2\n")
    assert "[*] --> received" in done.stdout
