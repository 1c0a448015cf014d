"""LEASEFLOW_LOG_FORMAT and LEASEFLOW_LOG_LEVEL (leaseflow/logfmt.py): the JSON lines,
the unchanged console text, levels by name, and where the lines go."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator

import pydantic
import pytest

from leaseflow import cli_flower, logfmt, logs
from leaseflow.settings import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LEASEFLOW_"):
            monkeypatch.delenv(name)


@pytest.fixture
def restored() -> Iterator[None]:
    """The ``leaseflow`` logger as it was before the test (handlers, level, propagation)."""
    logger = logs.logger
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    for handler in logger.handlers[:]:
        if handler not in handlers:
            logger.removeHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate


def test_levels_are_read_by_name_and_a_wrong_one_is_refused(monkeypatch: pytest.MonkeyPatch):
    # Given levels and formats as an operator types them
    monkeypatch.setenv("LEASEFLOW_LOG_LEVEL", "debug")
    monkeypatch.setenv("LEASEFLOW_LOG_FORMAT", "JSON")
    # Then they are read by name, case-insensitive
    assert (Settings().log_level, Settings().log_format) == ("DEBUG", "json")
    monkeypatch.setenv("LEASEFLOW_LOG_LEVEL", "warn")
    assert Settings().log_level == "WARNING"
    monkeypatch.setenv("LEASEFLOW_LOG_LEVEL", "")
    assert Settings().log_level is None
    # And a level or format that does not exist is refused, naming the variable
    for name, value in (("LEASEFLOW_LOG_LEVEL", "loud"), ("LEASEFLOW_LOG_FORMAT", "xml")):
        monkeypatch.setenv(name, value)
        with pytest.raises(pydantic.ValidationError) as caught:
            Settings()
        assert caught.value.errors()[0]["loc"] == (name.removeprefix("LEASEFLOW_").lower(),)
        monkeypatch.delenv(name)


def test_a_json_line_has_the_envelope_and_every_field(restored: None):
    # Given the JSON format on a stream
    out = io.StringIO()
    logfmt.configure(Settings(log_format="json", log_level="DEBUG"), stream=out)
    # When an engine event is logged (a field without a value among them)
    logs.warning(
        "state_retry",
        run_id="r1",
        state="s",
        step_seq=3,
        workflow="wf",
        lease_token="t",
        delay=None,
    )
    # Then one JSON object: ts (UTC), level, logger, action, message, and each field
    (line,) = out.getvalue().splitlines()
    doc = json.loads(line)
    assert doc["ts"].endswith("+00:00")
    assert (doc["level"], doc["logger"], doc["action"]) == ("WARNING", "leaseflow", "state_retry")
    fields = ("run_id", "workflow", "state", "step_seq", "lease_token")
    assert tuple(doc[f] for f in fields) == ("r1", "wf", "s", 3, "t")
    assert "delay" not in doc
    assert (
        doc["message"]
        == "action=state_retry run_id=r1 state=s step_seq=3 workflow=wf lease_token=t"
    )


def test_a_foreign_record_and_an_exception_are_json_too(restored: None):
    # Given the JSON format, and a line logged without leaseflow.logs (extra only)
    out = io.StringIO()
    logfmt.configure(Settings(log_format="json"), stream=out)
    try:
        raise ValueError("boom")
    except ValueError as exc:
        logs.logger.error("action=api_error", exc_info=exc, extra={"action": "api_error", "id": 7})
    # Then its extra fields and the traceback are in the object
    doc = json.loads(out.getvalue())
    assert (doc["action"], doc["id"]) == ("api_error", 7)
    assert "ValueError: boom" in doc["exc"]


def test_configure_is_idempotent_and_console_goes_back_to_the_process_handlers(
    restored: None,
):
    # Given JSON configured twice
    logfmt.configure(Settings(log_format="json"), stream=io.StringIO())
    logfmt.configure(Settings(log_format="json"), stream=io.StringIO())
    ours = [h for h in logs.logger.handlers if h.get_name() == logfmt.HANDLER_NAME]
    # Then one handler of ours, and no line written twice (no propagation)
    assert len(ours) == 1 and logs.logger.propagate is False
    # When console is configured (a worker: Celery's handlers write the text)
    logfmt.configure(Settings(log_level="ERROR"))
    # Then the handler is gone, lines propagate as before, at the level asked for
    assert not [h for h in logs.logger.handlers if h.get_name() == logfmt.HANDLER_NAME]
    assert logs.logger.propagate is True
    assert logs.logger.level == logging.ERROR


def test_the_default_console_text_is_unchanged(caplog: pytest.LogCaptureFixture, restored: None):
    # Given the defaults: nothing configured for a command (CLI or serve)
    logfmt.configure_cli(Settings())
    assert not [h for h in logs.logger.handlers if h.get_name() == logfmt.HANDLER_NAME]
    caplog.set_level(logging.INFO, logger="leaseflow")
    # When an event is logged
    logs.info("run_started", run_id="r1", workflow="wf", version=1)
    # Then its text is key=value, as operators and tests match it
    assert caplog.records[-1].getMessage() == "action=run_started run_id=r1 workflow=wf version=1"


def test_flower_binds_to_loopback_unless_told_otherwise():
    assert cli_flower.flower_argv(("--port=5555",)) == [
        "flower",
        "--port=5555",
        "--address=127.0.0.1",
    ]
    assert cli_flower.flower_argv(("--address=0.0.0.0",)) == ["flower", "--address=0.0.0.0"]
