"""The ``leaseflow`` command line, run in-process with click's CliRunner against a
real database (one per test) and a real broker queue (one per test)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
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
from leaseflow import local
from leaseflow.settings import Settings, reset_settings
from leaseflow.tasks import celery_app, dispatch
from tests import helpers
from tests.helpers import eventually

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

    def __call__(self, *args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(
            leaseflow_cli.main, list(args), input=input, prog_name="leaseflow"
        )


def failed_cleanly(result: Result, code: str, exit_code: int = 1) -> str:
    """The command failed with ``exit_code`` and ``error[<code>]: <message>`` on stderr,
    not a traceback; the message."""
    assert result.exit_code == exit_code, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught error
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert result.stderr.startswith(f"error[{code}]: "), result.stderr
    return result.stderr


def failed_as_json(result: Result, code: str, exit_code: int = 1) -> str:
    """With ``--json``: one ``{"code", "message"}`` object on stderr; the message."""
    assert result.exit_code == exit_code, (result.output, result.exception)
    assert result.stdout == ""
    assert json.loads(result.stderr)["code"] == code, result.stderr
    message: str = json.loads(result.stderr)["message"]
    return message


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
    client = redis.Redis.from_url(redis_url)
    messages = [m for key in dispatch.redis_queue_keys(queue) for m in client.lrange(key, 0, -1)]
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
    message = failed_cleanly(result, "E-IDEMPOTENCY-CONFLICT")
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
    assert fragment in failed_cleanly(result, "E-CONTEXT-INVALID")
    assert count_runs(db) == 0


def test_start_with_malformed_json_is_a_usage_error(cli: Cli, db: psycopg.Connection):
    result = cli("start", "linear5", "--input", '{"n": 1')
    message = failed_cleanly(result, "E-USAGE", exit_code=2)
    assert "--input" in message
    assert "not valid JSON" in message
    assert count_runs(db) == 0


def test_start_of_an_unknown_workflow_fails(cli: Cli, db: psycopg.Connection):
    result = cli("start", "no_such_workflow", "--input", "{}")
    message = failed_cleanly(result, "E-UNKNOWN-WORKFLOW")
    assert "unknown workflow 'no_such_workflow'" in message
    assert "LEASEFLOW_WORKFLOWS" in message
    assert count_runs(db) == 0


def test_start_of_an_unknown_version_fails(cli: Cli, db: psycopg.Connection):
    result = cli("start", "linear5", "--version", "9")
    assert "unknown workflow 'linear5 v9'" in failed_cleanly(result, "E-UNKNOWN-WORKFLOW")
    assert count_runs(db) == 0


def test_start_with_an_input_over_the_size_limit_fails(cli: Cli, db: psycopg.Connection):
    # Given a 200-byte payload limit
    cli.setenv("LEASEFLOW_MAX_PAYLOAD_BYTES", "200")
    # When a run is started with a larger input
    payload = json.dumps({"n": 1, "trail": ["x" * 300]})
    result = cli("start", "linear5", "--input", payload)
    # Then it is refused before anything is written
    message = failed_cleanly(result, "E-PAYLOAD-TOO-LARGE")
    assert "over the limit of 200 bytes (LEASEFLOW_MAX_PAYLOAD_BYTES)" in message
    assert count_runs(db) == 0


def test_start_with_an_unimportable_workflow_module_fails(cli: Cli, db: psycopg.Connection):
    cli.setenv("LEASEFLOW_WORKFLOWS", "tests.workflows.does_not_exist")
    result = cli("start", "linear5")
    assert "cannot import workflow module 'tests.workflows.does_not_exist'" in (
        failed_cleanly(result, "E-CONFIG")
    )
    assert count_runs(db) == 0


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        pytest.param('{"n": 1, "trail": ["a\\u0000b"]}', "contains a NUL byte", id="nul"),
        pytest.param(
            '{"n": 1, "x": ' + "[" * 500 + "]" * 500 + "}", "nests deeper than", id="deep"
        ),
        pytest.param(
            '{"n": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "the JSON is nested too deeply",
            id="deeper-than-the-parser",
        ),
    ],
)
def test_start_refuses_input_the_database_cannot_take(
    cli: Cli, db: psycopg.Connection, payload: str, fragment: str
):
    # When a run is started with a NUL byte in a string, or nesting too deep
    result = cli("start", "linear5", "--input", payload)
    # Then it is refused as invalid input, before the database is asked
    message = failed_cleanly(result, "E-CONTEXT-INVALID")
    assert "invalid input for workflow 'linear5'" in message
    assert fragment in message
    assert count_runs(db) == 0


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_start_reads_an_input_too_large_for_an_argument_from_a_file_or_stdin(
    cli: Cli, db: psycopg.Connection, tmp_path: Path, source: str
):
    # Given a 300 KiB input: more than one command-line argument may hold (128 KiB)
    payload = {"n": 7, "trail": ["x" * 1024] * 300}
    text = json.dumps(payload)
    path = tmp_path / "input.json"
    path.write_text(text)
    # When a run is started with it from a file (@path) or from stdin (-)
    if source == "file":
        result = cli("start", "linear5", "--input", f"@{path}")
    else:
        result = cli("start", "linear5", "--input", "-", input=text)
    # Then the run holds that input
    run_id = ok(result).strip()
    row = db.execute("SELECT input FROM lf_runs WHERE id = %s", [run_id]).fetchone()
    assert row == (payload,)


def test_start_with_an_unknown_option_is_a_usage_error(cli: Cli, db: psycopg.Connection):
    message = failed_cleanly(cli("start", "linear5", "--inptu", "{}"), "E-USAGE", exit_code=2)
    assert "No such option '--inptu'" in message
    assert "Try 'leaseflow start --help' for help." in message
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
    result = cli("runs", "list", "--status", "done")
    assert "'done'" in failed_cleanly(result, "E-USAGE", exit_code=2)


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
    assert all(row[7].isdigit() and row[9] for row in rows)  # duration_ms, worker


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
    errors = [row[-1] for row in step_rows(out) if row[1] == "shaky"]
    assert errors == [f"ConnectionError: transient failure on attempt {n}" for n in (1, 2, 3)], out


@pytest.mark.parametrize("run_id", [str(uuid.UUID(int=1)), "not-a-uuid"])
def test_runs_show_of_an_unknown_run_fails(cli: Cli, run_id: str):
    assert f"no run {run_id}" in failed_cleanly(cli("runs", "show", run_id), "E-RUN-NOT-FOUND")
    result = cli("runs", "show", run_id, "--json")
    assert failed_as_json(result, "E-RUN-NOT-FOUND") == f"no run {run_id}"


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
    assert "unknown workflow 'nope'" in failed_cleanly(
        bare_cli("graph", "nope"), "E-UNKNOWN-WORKFLOW"
    )
    result = bare_cli("graph", "linear5", "--format", "svg")
    assert "'svg'" in failed_cleanly(result, "E-USAGE", exit_code=2)


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
    result = bare_cli("db", "upgrade")
    assert "LEASEFLOW_DATABASE_URL is not set" in failed_cleanly(result, "E-CONFIG")


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("runs", "list"), id="runs-list"),
        pytest.param(("runs", "show", str(uuid.UUID(int=1))), id="runs-show"),
        pytest.param(("start", "linear5", "--input", '{"n": 1}'), id="start"),
    ],
)
def test_a_database_without_the_schema_says_to_upgrade_it(
    bare_cli: Cli, empty_database: str, redis_url: str, queue_name: str, args: tuple[str, ...]
):
    # Given a database without the lf_* tables
    bare_cli.setenv("LEASEFLOW_DATABASE_URL", empty_database)
    bare_cli.setenv("LEASEFLOW_BROKER_URL", redis_url)
    bare_cli.setenv("LEASEFLOW_DEFAULT_QUEUE", queue_name)
    # When a command reads or writes runs, it says to migrate it
    message = failed_cleanly(bare_cli(*args), "E-DB-NOT-MIGRATED")
    assert 'relation "lf_' in message
    assert "run `leaseflow db upgrade`" in message
    # And the same as JSON
    if args[0] == "runs":
        result = bare_cli(*args, "--json")
        assert "leaseflow db upgrade" in failed_as_json(result, "E-DB-NOT-MIGRATED")


def test_db_upgrade_of_a_missing_database_fails_cleanly(bare_cli: Cli, pg_template: str):
    base, _, _ = ADMIN_URL.rpartition("/")
    bare_cli.setenv("LEASEFLOW_DATABASE_URL", f"{base}/lf_cli_missing_{uuid.uuid4().hex[:8]}")
    message = failed_cleanly(bare_cli("db", "upgrade"), "E-STORE-UNAVAILABLE")
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


def test_beat_keeps_its_schedule_in_the_leaseflow_home(
    bare_cli: Cli, celery_argv: list[Any], tmp_path: Path
):
    # Given a LEASEFLOW_HOME that does not exist yet
    bare_cli.setenv("LEASEFLOW_HOME", str(tmp_path / "home"))
    # When beat starts without --schedule
    ok(bare_cli("beat"))
    # Then its schedule lives there, not in the working directory
    schedule = tmp_path / "home" / "celerybeat-schedule"
    assert celery_argv == [["beat", "-l", "INFO", "-s", str(schedule)]]
    assert schedule.parent.is_dir()


def test_beat_uses_the_given_schedule_file(bare_cli: Cli, celery_argv: list[Any], tmp_path: Path):
    schedule = tmp_path / "sub" / "beat.db"
    ok(bare_cli("beat", "-l", "WARNING", "--schedule", str(schedule)))
    assert celery_argv == [["beat", "-l", "WARNING", "-s", str(schedule)]]
    assert schedule.parent.is_dir()


# -- worker and beat refuse to start, as real processes -------------------------------

#: The ``leaseflow`` command of this environment.
LEASEFLOW = str(Path(sys.executable).with_name("leaseflow"))
#: How long a process that must refuse to start may take to exit.
REFUSAL_DEADLINE = 30.0


class CliProcess(helpers._Subprocess):
    """A real ``leaseflow ...`` (or ``celery ...``) process, its output in a log file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_dir: Path, name: str) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._spawn(cmd, env)

    def exit_status(self) -> int:
        """Its exit status; fails the test if it is still running at the deadline."""
        eventually(
            lambda: self.proc.poll() is not None,
            timeout=REFUSAL_DEADLINE,
            message=f"{self.name} exited (log: {self.log()[-2000:]!r})",
        )
        return self.proc.returncode


def celery_worker(settings: Settings, tmp_path: Path, env: dict[str, str]) -> CliProcess:
    """``celery -A leaseflow.tasks worker``, started directly (not by ``leaseflow worker``)."""
    cmd = [sys.executable, "-m", "celery", "-A", "leaseflow.tasks", "worker", "-P", "solo"]
    cmd += ["-Q", settings.default_queue, "--without-gossip", "--without-mingle"]
    return CliProcess(cmd, helpers.settings_env(settings, **env), tmp_path, "celery-worker")


def test_leaseflow_worker_refuses_invalid_definitions(settings: Settings, tmp_path: Path):
    # Given workflows with a typo in to= and with no initial state
    env = helpers.settings_env(settings, LEASEFLOW_WORKFLOWS="tests.workflows.invalid")
    # When `leaseflow worker` starts
    proc = CliProcess([LEASEFLOW, "worker", "-P", "solo"], env, tmp_path, "worker")
    with helpers.processes(proc):
        # Then it exits 1 before Celery starts, naming every problem of both workflows
        assert proc.exit_status() == 1
        log = proc.log()
    assert "error[E-DEFINITION]: workflow 'no_initial' is invalid" in log
    assert "error[E-DEFINITION]: workflow 'typo_in_to' is invalid" in log
    assert "'sceond'" in log
    assert "initial=True" in log
    assert "ready." not in log
    assert "Traceback" not in log


def test_celery_worker_started_directly_refuses_invalid_definitions(
    settings: Settings, tmp_path: Path
):
    # When `celery -A leaseflow.tasks worker` starts with invalid definitions
    proc = celery_worker(settings, tmp_path, {"LEASEFLOW_WORKFLOWS": "tests.workflows.invalid"})
    with helpers.processes(proc):
        # Then it exits non-zero instead of serving (Celery swallows worker_init errors)
        assert proc.exit_status() != 0
        log = proc.log()
    assert "action=worker_refused code=E-DEFINITION" in log
    assert "'sceond'" in log
    assert "ready." not in log


def test_leaseflow_worker_without_workflows_refuses(settings: Settings, tmp_path: Path):
    # When `leaseflow worker` starts with no LEASEFLOW_WORKFLOWS
    env = helpers.settings_env(settings, LEASEFLOW_WORKFLOWS="")
    proc = CliProcess([LEASEFLOW, "worker", "-P", "solo"], env, tmp_path, "worker")
    with helpers.processes(proc):
        # Then it refuses: runs sent to it would be dropped as unregistered tasks
        assert proc.exit_status() == 1
        log = proc.log()
    assert "error[E-CONFIG]: no workflow to serve: LEASEFLOW_WORKFLOWS is not set" in log
    assert "leaseflow worker --maintenance-only" in log
    assert "ready." not in log


def test_celery_worker_started_directly_without_workflows_refuses(
    settings: Settings, tmp_path: Path
):
    proc = celery_worker(settings, tmp_path, {"LEASEFLOW_WORKFLOWS": ""})
    with helpers.processes(proc):
        assert proc.exit_status() != 0
        log = proc.log()
    assert "action=worker_refused code=E-CONFIG" in log
    assert "ready." not in log


def test_a_maintenance_only_worker_serves_the_beat_queue_alone(settings: Settings, tmp_path: Path):
    # When `leaseflow worker --maintenance-only` starts with no workflows
    env = helpers.settings_env(settings, LEASEFLOW_WORKFLOWS="")
    cmd = [LEASEFLOW, "worker", "--maintenance-only", "-P", "solo", "--without-gossip"]
    proc = CliProcess(cmd, env, tmp_path, "maintenance")
    with helpers.processes(proc):
        # Then it starts, consuming the beat queue and not the states' queue
        log = proc.wait_log("ready.", timeout=REFUSAL_DEADLINE)
    consumed = re.findall(r"^\s*\.> (\S+)\s+exchange=", log, re.M)
    assert consumed == [settings.maintenance_queue], log


def test_leaseflow_beat_refuses_invalid_definitions(settings: Settings, tmp_path: Path):
    env = helpers.settings_env(settings, LEASEFLOW_WORKFLOWS="tests.workflows.invalid")
    cmd = [LEASEFLOW, "beat", "--schedule", str(tmp_path / "schedule")]
    proc = CliProcess(cmd, env, tmp_path, "beat")
    with helpers.processes(proc):
        assert proc.exit_status() == 1
        log = proc.log()
    assert "error[E-DEFINITION]: workflow 'typo_in_to' is invalid" in log
    assert "beat: Starting" not in log


# -- which database a command reads --------------------------------------------------


@pytest.fixture
def embedded_home(tmp_path: Path) -> Iterator[Path]:
    """A LEASEFLOW_HOME; afterwards its server is gone, and its cluster (as root, kept
    in the server user's own directory) removed."""
    home = tmp_path / "home"
    yield home
    pgdata = local.pgdata_dir(home)
    eventually(lambda: not local.postgres_pids(pgdata), timeout=10, message="server stopped")
    if local.cluster_dir(home) != home:
        shutil.rmtree(local.cluster_dir(home), ignore_errors=True)


def test_commands_name_the_embedded_database_they_read(tmp_path: Path, embedded_home: Path):
    # Given no database URL: the embedded PostgreSQL under LEASEFLOW_HOME
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEASEFLOW_")}
    env.update(LEASEFLOW_HOME=str(embedded_home), LEASEFLOW_WORKFLOWS="tests.workflows.basic")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(helpers.ROOT), env.get("PYTHONPATH")]))

    def leaseflow(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [LEASEFLOW, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stderr
        return done

    # When runs are started, listed and shown
    started = leaseflow("start", "linear5", "--input", '{"n": 1}')
    run_id = started.stdout.strip()
    listed = leaseflow("runs", "list", "--json")
    shown = leaseflow("runs", "show", run_id, "--json")
    # Then each says on stderr, in one line, which database it read; stdout has the data
    pgdata = local.pgdata_dir(embedded_home)
    for done in (started, listed, shown):
        lines = done.stderr.splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("leaseflow: database embedded PostgreSQL"), lines[0]
        assert str(pgdata) in lines[0]
    assert [run["id"] for run in json.loads(listed.stdout)] == [run_id]
    assert json.loads(shown.stdout)["id"] == run_id


# -- environment --------------------------------------------------------------------


def test_a_malformed_setting_is_named_without_a_traceback(bare_cli: Cli):
    bare_cli.setenv("LEASEFLOW_LEASE_TTL", "-1")
    assert "LEASEFLOW_LEASE_TTL" in failed_cleanly(bare_cli("runs", "list"), "E-CONFIG")


def test_help_needs_no_configuration(bare_cli: Cli):
    out = ok(bare_cli("--help"))
    for command in ("db", "worker", "beat", "start", "runs", "graph"):
        assert re.search(rf"^  {command}\s", out, re.M), command
