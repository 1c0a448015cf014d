"""The ``leaseflow`` command line, run in-process with click's CliRunner against a
real database (one per test) and a real broker queue (one per test)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from click.testing import CliRunner, Result
from kombu import Connection, Exchange, Queue

from leaseflow import cli as leaseflow_cli
from leaseflow.settings import reset_settings
from leaseflow.tasks import celery_app

ADMIN_URL = os.environ.get(
    "LEASEFLOW_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
#: A row of a rich table whose first cell is a number (a step's seq).
STEP_ROW = re.compile(r"^│\s*\d+\s*│")


class Cli:
    """Runs ``leaseflow ...`` in this process under an environment of the test's own."""

    def __init__(self, env: pytest.MonkeyPatch) -> None:
        self.env = env

    def setenv(self, name: str, value: str) -> None:
        self.env.setenv(name, value)
        reset_settings()

    def __call__(self, *args: str) -> Result:
        return CliRunner().invoke(leaseflow_cli.main, list(args))


def failed_cleanly(result: Result, exit_code: int = 1) -> str:
    """The command failed with ``exit_code`` and a message, not a traceback; the message."""
    assert result.exit_code == exit_code, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught error
    assert "Traceback" not in result.output
    assert result.stderr.startswith(("Error: ", "Usage: ")), result.stderr
    return result.stderr


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


@pytest.fixture
def bare_cli() -> Iterator[Cli]:
    """The CLI with only LEASEFLOW_WORKFLOWS set: no database, no broker."""
    with pytest.MonkeyPatch.context() as env:
        for name in list(os.environ):
            if name.startswith("LEASEFLOW_"):
                env.delenv(name)
        env.setenv("LEASEFLOW_WORKFLOWS", "tests.workflows.basic")
        reset_settings()
        yield Cli(env)
    reset_settings()


@pytest.fixture
def cli(bare_cli: Cli, database_url: str, redis_url: str, queue_name: str) -> Iterator[Cli]:
    """The CLI pointed at this test's database, broker and queue."""
    bare_cli.setenv("LEASEFLOW_DATABASE_URL", database_url)
    bare_cli.setenv("LEASEFLOW_BROKER_URL", redis_url)
    bare_cli.setenv("LEASEFLOW_DEFAULT_QUEUE", queue_name)
    yield bare_cli
    delete_queue(redis_url, queue_name)


def delete_queue(broker_url: str, queue: str) -> None:
    """Drop ``queue``, its messages and its bindings.

    kombu only deletes the bindings a channel knows of, so declare them first.
    """
    with contextlib.suppress(Exception), Connection(broker_url) as conn:
        bound = Queue(queue, Exchange(queue), routing_key=queue)(conn.default_channel)
        bound.declare()
        bound.delete()


def count_runs(db: psycopg.Connection) -> int:
    row = db.execute("SELECT count(*) FROM lf_runs").fetchone()
    assert row is not None
    return int(row[0])


def queued_tasks(redis_url: str, queue: str) -> list[tuple[str, str]]:
    """``(task name, task id)`` of the messages waiting on ``queue``."""
    messages = redis.Redis.from_url(redis_url).lrange(queue, 0, -1)
    return [
        (headers["task"], headers["id"]) for headers in (json.loads(m)["headers"] for m in messages)
    ]


def step_rows(table: str) -> list[list[str]]:
    """The cells of each step row of ``runs show``'s step table."""
    return [
        [cell.strip() for cell in line.strip("│").split("│")]
        for line in table.splitlines()
        if STEP_ROW.match(line)
    ]


# -- start --------------------------------------------------------------------------


def test_start_prints_the_id_of_a_new_pending_run(
    cli: Cli, db: psycopg.Connection, redis_url: str, queue_name: str
):
    # When a run is started from the command line
    out = ok(cli("start", "linear5", "--input", '{"n": 3}'))
    # Then it prints the run id, and only that
    run_id = out.strip()
    assert out == run_id + "\n"
    assert str(uuid.UUID(run_id)) == run_id
    # And the run is in the database, pending in its initial state
    row = db.execute(
        "SELECT workflow, version, status, state, input FROM lf_runs WHERE id = %s", [run_id]
    ).fetchone()
    assert row == ("linear5", 1, "pending", "s1", {"n": 3})
    # And its first step was published on this environment's queue
    assert queued_tasks(redis_url, queue_name) == [("leaseflow.linear5.s1", f"{run_id}:1")]


def test_start_with_an_idempotency_key_twice_yields_one_run(cli: Cli, db: psycopg.Connection):
    # Given a run started with a key
    first = ok(cli("start", "linear5", "--input", '{"n": 1}', "--idempotency-key", "k-1"))
    # When it is started again with the same key and input
    second = ok(cli("start", "linear5", "--input", '{"n": 1}', "--idempotency-key", "k-1"))
    # Then the same run id comes back and there is one run
    assert first == second
    assert count_runs(db) == 1


def test_start_refuses_a_reused_idempotency_key_with_another_input(
    cli: Cli, db: psycopg.Connection
):
    # Given a run started with a key
    run_id = ok(cli("start", "linear5", "--input", '{"n": 1}', "--idempotency-key", "k-2"))
    # When the key is reused with a different input
    result = cli("start", "linear5", "--input", '{"n": 2}', "--idempotency-key", "k-2")
    # Then it fails with a message naming the key and the existing run
    message = failed_cleanly(result)
    assert "'k-2'" in message
    assert run_id.strip() in message
    assert count_runs(db) == 1


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        pytest.param('{"n": "not a number"}', "invalid input for workflow 'linear5'", id="schema"),
        pytest.param("[1, 2]", "must be a JSON object", id="not-an-object"),
        pytest.param('{"n": NaN}', "not JSON-serialisable", id="nan"),
    ],
)
def test_start_with_invalid_input_fails_and_creates_no_run(
    cli: Cli, db: psycopg.Connection, payload: str, fragment: str
):
    # When a run is started with input its context model refuses
    result = cli("start", "linear5", "--input", payload)
    # Then the command fails with a clear message, and no run exists
    assert fragment in failed_cleanly(result)
    assert count_runs(db) == 0


def test_start_with_malformed_json_is_a_usage_error(cli: Cli, db: psycopg.Connection):
    result = cli("start", "linear5", "--input", '{"n": 1')
    message = failed_cleanly(result, exit_code=2)
    assert "--input" in message
    assert "not valid JSON" in message
    assert count_runs(db) == 0


def test_start_of_an_unknown_workflow_fails(cli: Cli, db: psycopg.Connection):
    result = cli("start", "no_such_workflow", "--input", "{}")
    message = failed_cleanly(result)
    assert "unknown workflow 'no_such_workflow'" in message
    assert "LEASEFLOW_WORKFLOWS" in message
    assert count_runs(db) == 0


def test_start_of_an_unknown_version_fails(cli: Cli, db: psycopg.Connection):
    result = cli("start", "linear5", "--version", "9")
    assert "unknown workflow 'linear5 v9'" in failed_cleanly(result)
    assert count_runs(db) == 0


def test_start_with_an_input_over_the_size_limit_fails(cli: Cli, db: psycopg.Connection):
    # Given a 200-byte checkpoint limit
    cli.setenv("LEASEFLOW_MAX_CHECKPOINT_BYTES", "200")
    # When a run is started with a larger input
    payload = json.dumps({"n": 1, "trail": ["x" * 300]})
    result = cli("start", "linear5", "--input", payload)
    # Then it is refused before anything is written
    assert "over the limit of 200 bytes" in failed_cleanly(result)
    assert count_runs(db) == 0


def test_start_with_an_unimportable_workflow_module_fails(cli: Cli, db: psycopg.Connection):
    cli.setenv("LEASEFLOW_WORKFLOWS", "tests.workflows.does_not_exist")
    result = cli("start", "linear5")
    assert "cannot import workflow module 'tests.workflows.does_not_exist'" in (
        failed_cleanly(result)
    )
    assert count_runs(db) == 0


# -- runs list ----------------------------------------------------------------------


@pytest.fixture
def two_runs(cli: Cli) -> dict[str, str]:
    return {
        "linear5": ok(cli("start", "linear5", "--input", '{"n": 1}')).strip(),
        "flaky": ok(cli("start", "flaky", "--input", "{}")).strip(),
    }


def test_runs_list_shows_runs_as_a_table(cli: Cli, two_runs: dict[str, str]):
    # When the runs are listed
    out = ok(cli("runs", "list"))
    # Then each run has a row with its workflow, status and state
    rows = {line for line in out.splitlines() if line.startswith("│")}
    linear = next(row for row in rows if two_runs["linear5"] in row)
    flaky = next(row for row in rows if two_runs["flaky"] in row)
    assert re.search(r"│ linear5 v1\s*│ pending\s*│ s1\s*│ 0/3\s*│", linear), linear
    assert re.search(r"│ flaky v1\s*│ pending\s*│ enter\s*│", flaky), flaky
    assert "2 run(s)" in out


def test_runs_list_as_json(cli: Cli, two_runs: dict[str, str]):
    # When the runs are listed as JSON
    listed = json.loads(ok(cli("runs", "list", "--json")))
    # Then each run is an object with its fields, newest first
    assert [run["id"] for run in listed] == [two_runs["flaky"], two_runs["linear5"]]
    linear = listed[1]
    assert (linear["workflow"], linear["status"], linear["state"]) == ("linear5", "pending", "s1")
    assert linear["input"] == {"n": 1}
    assert linear["steps"] == []
    assert set(linear) >= {"attempt", "error_code", "created_at", "updated_at"}


def test_runs_list_filters_by_workflow_status_and_limit(cli: Cli, two_runs: dict[str, str]):
    def ids(*args: str) -> list[str]:
        return [run["id"] for run in json.loads(ok(cli("runs", "list", "--json", *args)))]

    assert ids("--workflow", "linear5") == [two_runs["linear5"]]
    assert ids("--status", "completed") == []
    assert ids("--status", "pending", "--limit", "1") == [two_runs["flaky"]]


def test_runs_list_refuses_an_unknown_status(cli: Cli):
    assert "'done'" in failed_cleanly(cli("runs", "list", "--status", "done"), exit_code=2)


def test_runs_list_of_an_empty_database(cli: Cli):
    assert json.loads(ok(cli("runs", "list", "--json"))) == []
    assert "0 run(s)" in ok(cli("runs", "list"))


# -- runs show ----------------------------------------------------------------------


def test_runs_show_a_completed_run_with_its_five_steps(cli: Cli, client: Any, inline_worker: Any):
    # Given a run started from the command line and finished by a worker
    run_id = ok(cli("start", "linear5", "--input", '{"n": 4}')).strip()
    assert client.wait_for(run_id, timeout=30).status == "completed"
    # When it is shown
    out = ok(cli("runs", "show", run_id))
    # Then the details name the run and its outcome
    assert re.search(rf"^id\s+{run_id}\s*$", out, re.M), out
    assert re.search(r"^status\s+completed\s*$", out, re.M), out
    assert '"trail": ["s1", "s2", "s3", "s4", "s5"]' in out
    # And the step log has one row per state, in order
    rows = step_rows(out)
    assert [row[:5] for row in rows] == [
        ["1", "s1", "1", "next", "s2"],
        ["2", "s2", "1", "next", "s3"],
        ["3", "s3", "1", "next", "s4"],
        ["4", "s4", "1", "next", "s5"],
        ["5", "s5", "1", "completed", ""],
    ]
    assert all(row[7].isdigit() and row[8] for row in rows)  # duration_ms, worker


def test_runs_show_as_json(cli: Cli, client: Any, inline_worker: Any):
    # Given a completed run
    run_id = ok(cli("start", "linear5", "--input", '{"n": 4}')).strip()
    client.wait_for(run_id, timeout=30)
    # When it is shown as JSON
    shown = json.loads(ok(cli("runs", "show", run_id, "--json")))
    # Then it is the run's record with its step log
    assert (shown["id"], shown["status"], shown["state"]) == (run_id, "completed", "s5")
    assert shown["output"] == {"n": 4, "trail": ["s1", "s2", "s3", "s4", "s5"]}
    steps = shown["steps"]
    assert [s["seq"] for s in steps] == [1, 2, 3, 4, 5]
    assert [s["state"] for s in steps] == ["s1", "s2", "s3", "s4", "s5"]
    assert [s["outcome"] for s in steps] == ["next"] * 4 + ["completed"]
    assert all(isinstance(s["finished_at"], str) for s in steps)


def test_runs_show_a_failed_run_names_each_error_in_one_line(
    cli: Cli, client: Any, inline_worker: Any
):
    # Given a run whose state fails on every attempt
    run_id = ok(cli("start", "flaky", "--input", '{"fail_times": 9}')).strip()
    assert client.wait_for(run_id, timeout=30).status == "failed"
    # When it is shown
    out = ok(cli("runs", "show", run_id))
    # Then the run's error code is shown and each failed step its exception line
    assert "E-STATE-ERROR" in out
    errors = [row[9] for row in step_rows(out) if row[1] == "shaky"]
    assert errors == [f"ConnectionError: transient failure on attempt {n}" for n in (1, 2, 3)], out


@pytest.mark.parametrize("run_id", [str(uuid.UUID(int=1)), "not-a-uuid"])
def test_runs_show_of_an_unknown_run_fails(cli: Cli, run_id: str):
    assert f"no run {run_id}" in failed_cleanly(cli("runs", "show", run_id))
    assert f"no run {run_id}" in failed_cleanly(cli("runs", "show", run_id, "--json"))


# -- graph --------------------------------------------------------------------------


def test_graph_as_mermaid(bare_cli: Cli):
    out = ok(bare_cli("graph", "linear5", "--format", "mermaid"))
    lines = out.splitlines()
    assert lines[0] == "stateDiagram-v2"
    for edge in ("[*] --> s1", "s1 --> s2", "s2 --> s3", "s3 --> s4", "s4 --> s5", "s5 --> [*]"):
        assert f"    {edge}" in lines


def test_graph_defaults_to_mermaid(bare_cli: Cli):
    assert ok(bare_cli("graph", "linear5")) == ok(
        bare_cli("graph", "linear5", "--format", "mermaid")
    )


def test_graph_as_dot_shows_on_error_edges(bare_cli: Cli):
    out = ok(bare_cli("graph", "recovering", "--format", "dot", "--version", "1"))
    lines = out.splitlines()
    assert lines[0] == 'digraph "recovering_v1" {'
    assert '    "__start__" -> "risky";' in lines
    assert '    "risky" -> "ok";' in lines
    assert '    "risky" -> "fallback" [style=dashed, label="on_error"];' in lines


def test_graph_of_an_unknown_workflow_or_format_fails(bare_cli: Cli):
    assert "unknown workflow 'nope'" in failed_cleanly(bare_cli("graph", "nope"))
    assert "'svg'" in failed_cleanly(bare_cli("graph", "linear5", "--format", "svg"), 2)


# -- db upgrade ---------------------------------------------------------------------


@pytest.fixture
def empty_database(pg_template: str) -> Iterator[str]:
    """A database with no tables at all (not cloned from the migrated template)."""
    name = f"lf_cli_empty_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = ADMIN_URL.rpartition("/")
    yield f"{base}/{name}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_db_upgrade_creates_the_schema_of_an_empty_database(bare_cli: Cli, empty_database: str):
    # Given an empty database
    bare_cli.setenv("LEASEFLOW_DATABASE_URL", empty_database)
    # When it is upgraded
    out = ok(bare_cli("db", "upgrade"))
    # Then the tables exist and the command says what it did
    with psycopg.connect(empty_database, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT to_regclass('lf_runs'), to_regclass('lf_steps'), to_regclass('lf_transitions')"
        ).fetchone()
        version = conn.execute("SELECT version_num FROM lf_alembic_version").fetchone()
    assert tables == ("lf_runs", "lf_steps", "lf_transitions")
    assert version is not None
    assert f"upgraded from <empty> to revision {version[0]}" in out
    assert empty_database.rpartition("/")[2] in out
    # And a second upgrade is a no-op that says so
    assert f"already at revision {version[0]}" in ok(bare_cli("db", "upgrade"))


def test_db_upgrade_needs_a_database_url(bare_cli: Cli):
    assert "LEASEFLOW_DATABASE_URL is not set" in failed_cleanly(bare_cli("db", "upgrade"))


def test_db_upgrade_of_a_missing_database_fails_cleanly(bare_cli: Cli, pg_template: str):
    base, _, _ = ADMIN_URL.rpartition("/")
    bare_cli.setenv("LEASEFLOW_DATABASE_URL", f"{base}/lf_cli_missing_{uuid.uuid4().hex[:8]}")
    message = failed_cleanly(bare_cli("db", "upgrade"))
    assert "cannot migrate" in message
    assert "does not exist" in message


# -- worker and beat ----------------------------------------------------------------


@pytest.fixture
def celery_argv(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record what the CLI asks Celery to run, instead of running it."""
    calls: list[list[str]] = []

    def record(argv: list[str]) -> int | None:
        calls.append(list(argv))
        return None

    monkeypatch.setattr(celery_app.get_app(), "worker_main", record)
    monkeypatch.setattr(celery_app.get_app(), "start", record)
    return calls


def test_worker_runs_celery_worker_on_the_default_queue(bare_cli: Cli, celery_argv: list[Any]):
    bare_cli.setenv("LEASEFLOW_DEFAULT_QUEUE", "q-default")
    ok(bare_cli("worker"))
    assert celery_argv == [["worker", "-Q", "q-default", "-l", "INFO"]]


def test_worker_passes_queues_concurrency_pool_and_extra_arguments(
    bare_cli: Cli, celery_argv: list[Any]
):
    ok(
        bare_cli(
            "worker", "-Q", "a,b", "-c", "3", "--pool", "threads", "-l", "DEBUG", "--without-gossip"
        )
    )
    assert celery_argv == [
        ["worker", "-Q", "a,b", "-l", "DEBUG", "-c", "3", "--pool", "threads", "--without-gossip"]
    ]


def test_worker_exits_with_celerys_exit_code(bare_cli: Cli, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(celery_app.get_app(), "worker_main", lambda argv: 3)
    assert bare_cli("worker").exit_code == 3


def test_beat_keeps_its_schedule_in_the_cache_directory(
    bare_cli: Cli, celery_argv: list[Any], tmp_path: Path
):
    # Given a cache directory that does not exist yet
    bare_cli.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # When beat starts without --schedule
    ok(bare_cli("beat"))
    # Then its schedule lives there, not in the working directory
    schedule = tmp_path / "cache" / "leaseflow" / "celerybeat-schedule"
    assert celery_argv == [["beat", "-l", "INFO", "-s", str(schedule)]]
    assert schedule.parent.is_dir()


def test_beat_uses_the_given_schedule_file(bare_cli: Cli, celery_argv: list[Any], tmp_path: Path):
    schedule = tmp_path / "sub" / "beat.db"
    ok(bare_cli("beat", "-l", "WARNING", "--schedule", str(schedule)))
    assert celery_argv == [["beat", "-l", "WARNING", "-s", str(schedule)]]
    assert schedule.parent.is_dir()


# -- environment --------------------------------------------------------------------


def test_a_malformed_setting_is_named_without_a_traceback(bare_cli: Cli):
    bare_cli.setenv("LEASEFLOW_LEASE_TTL", "-1")
    assert "LEASEFLOW_LEASE_TTL" in failed_cleanly(bare_cli("runs", "list"))


def test_help_needs_no_configuration(bare_cli: Cli):
    out = ok(bare_cli("--help"))
    for command in ("db", "worker", "beat", "start", "runs", "graph"):
        assert re.search(rf"^  {command}\s", out, re.M), command
