"""What a worker logs when a step goes wrong (runner, beat jobs), and which of Celery's
lines about the beat jobs are lowered to DEBUG (beat.tasks.QuietTicks)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from celery.app import trace
from pydantic import BaseModel

from leaseflow import Complete, Failed, Parallel, Retry, Workflow, errors
from leaseflow.beat import tasks as beat_tasks
from leaseflow.testing import engine


class Ctx(BaseModel):
    fail_times: int = 0


def flaky() -> Workflow:
    wf = Workflow("logs_flaky", context=Ctx, register=False)

    @wf.state(initial=True, to=["done"], retry=Retry(max_attempts=2, backoff=5.0, jitter=0))
    def charge(ctx: Any) -> str:
        if ctx.attempt <= ctx.data.fail_times:
            raise ConnectionError(f"gateway timed out\non attempt {ctx.attempt}")
        return "done"

    @wf.state()
    def done(ctx: Any) -> Complete:
        return Complete()

    return wf


def actions(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int, dict[str, Any]]]:
    """``(action, level, record fields)`` of every leaseflow line captured."""
    return [
        (r.action, r.levelno, r.__dict__)
        for r in caplog.records
        if r.name == "leaseflow" and hasattr(r, "action")
    ]


def only(caplog: pytest.LogCaptureFixture, action: str) -> tuple[int, dict[str, Any]]:
    found = [(level, fields) for name, level, fields in actions(caplog) if name == action]
    assert len(found) == 1, actions(caplog)
    return found[0]


def test_a_retry_logs_a_warning_with_the_exception(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="leaseflow")
    with engine() as eng:
        # Given a state that fails its first attempt
        run_id = eng.start(flaky(), {"fail_times": 1})
        # When it runs
        eng.run_until_idle()
    # Then the retry is one WARNING line naming the run, state, step and exception
    level, fields = only(caplog, "state_retry")
    assert level == logging.WARNING
    assert (fields["run_id"], fields["state"], fields["step_seq"]) == (run_id, "charge", 1)
    assert (fields["attempt"], fields["max_attempts"], fields["delay"]) == (1, 2, 5.0)
    assert fields["error"] == "ConnectionError: gateway timed out | on attempt 1"
    assert "action=state_retry" in caplog.text


def test_a_failed_run_logs_an_error_with_its_code(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="leaseflow")
    with engine() as eng:
        # Given a state that fails on every attempt
        run_id = eng.start(flaky(), {"fail_times": 9})
        # When its attempts are spent
        eng.run_until_done(run_id)
    # Then one retry WARNING, then one ERROR naming the code and the exception
    assert [(a, lvl) for a, lvl, _ in actions(caplog) if lvl >= logging.WARNING] == [
        ("state_retry", logging.WARNING),
        ("run_failed", logging.ERROR),
    ]
    _, fields = only(caplog, "run_failed")
    assert (fields["run_id"], fields["state"], fields["step_seq"]) == (run_id, "charge", 2)
    assert fields["error_code"] == errors.STATE_ERROR
    assert (fields["attempt"], fields["error"]) == (
        2,
        "ConnectionError: gateway timed out | on attempt 2",
    )
    assert not [a for a, _, _ in actions(caplog) if a == "run_finished"]


def test_a_failed_outcome_logs_an_error_with_the_applications_code(
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO, logger="leaseflow")
    wf = Workflow("logs_refuse", context=Ctx, register=False)

    @wf.state(initial=True, end="failed")
    def refuse(ctx: Any) -> Failed:
        return Failed("amount must be positive", code="ORDER-EMPTY")

    with engine() as eng:
        eng.start(wf)
        eng.run_until_idle()
    level, fields = only(caplog, "run_failed")
    assert (level, fields["error_code"]) == (logging.ERROR, "ORDER-EMPTY")
    assert fields["error"] == "ORDER-EMPTY: amount must be positive"


def test_an_error_handled_by_on_error_logs_a_warning(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="leaseflow")
    wf = Workflow("logs_rescue", context=Ctx, register=False)

    @wf.state(initial=True, on_error="rescue", retry=Retry(max_attempts=1))
    def work(ctx: Any) -> str:
        raise KeyError("sku")

    @wf.state()
    def rescue(ctx: Any) -> Complete:
        return Complete()

    with engine() as eng:
        eng.start(wf)
        eng.run_until_idle()
    level, fields = only(caplog, "state_error_handled")
    assert (level, fields["next_state"], fields["error"]) == (
        logging.WARNING,
        "rescue",
        "KeyError: 'sku'",
    )
    assert only(caplog, "run_finished")[0] == logging.INFO


def test_a_completed_run_logs_no_warning(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG, logger="leaseflow")
    with engine() as eng:
        eng.run_until_done(eng.start(flaky()))
    assert [a for a, lvl, _ in actions(caplog) if lvl >= logging.WARNING] == []
    assert only(caplog, "run_finished")[0] == logging.INFO


def test_a_branch_that_fails_the_run_logs_warnings_then_an_error(
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO, logger="leaseflow")
    wf = Workflow("logs_fanout", context=Ctx, register=False)

    @wf.state(initial=True, to=["join"], branches=["leaf"])
    def fan(ctx: Any) -> Parallel:
        return Parallel(branches=["leaf"], join="join")

    @wf.state(branch=True, retry=Retry(max_attempts=2, backoff=0, jitter=0))
    def leaf(ctx: Any) -> Any:
        raise RuntimeError("lookup down")

    @wf.state()
    def join(ctx: Any) -> Complete:
        return Complete()

    with engine() as eng:
        run_id = eng.start(wf)
        eng.run_until_idle()
    warned = [(a, lvl) for a, lvl, _ in actions(caplog) if lvl >= logging.WARNING]
    assert warned == [
        ("branch_retry", logging.WARNING),
        ("branch_failed", logging.WARNING),
        ("run_failed", logging.ERROR),
    ]
    _, fields = only(caplog, "run_failed")
    assert (fields["run_id"], fields["error_code"]) == (run_id, errors.BRANCH_FAILED)


def test_a_run_the_reaper_fails_logs_an_error(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="leaseflow")
    wf = Workflow("logs_reaped", context=Ctx, register=False)

    @wf.state(initial=True, retry=Retry(max_attempts=1))
    def only_state(ctx: Any) -> Complete:
        return Complete()

    with engine(lease_ttl=10) as eng:
        # Given a worker that dies in the run's only attempt
        eng.crash_next("only_state")
        run_id = eng.start(wf)
        eng.run_until_idle()
        # When its lease expires and the reaper runs
        eng.advance(11)
        assert eng.get(run_id).status == "failed"
    # Then the reaped lease is an ERROR line with the run's code
    level, fields = only(caplog, "lease_reaped")
    assert (level, fields["result"], fields["error_code"]) == (
        logging.ERROR,
        "failed",
        errors.LEASE_EXPIRED,
    )


def test_a_requeued_lease_stays_a_warning(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="leaseflow")
    with engine(lease_ttl=10) as eng:
        eng.crash_next("charge")
        run_id = eng.start(flaky())
        eng.run_until_idle()
        eng.advance(11)
        eng.run_until_done(run_id)
    level, fields = only(caplog, "lease_reaped")
    assert (level, fields["result"], fields.get("error_code")) == (
        logging.WARNING,
        "requeued",
        None,
    )


# -- Celery's lines about the beat jobs ------------------------------------------------


def celery_record(logger: str, msg: str, **data: Any) -> logging.LogRecord:
    """A record as Celery's worker (``strategy``) or tracer (``trace``) makes it."""
    record = logging.LogRecord(logger, logging.INFO, __file__, 1, msg, (data,), None)
    record.data = data
    return record


def received(name: str) -> logging.LogRecord:
    return celery_record("celery.worker.strategy", trace.LOG_RECEIVED, id="t1", name=name)


def succeeded(name: str, value: str) -> logging.LogRecord:
    return celery_record(
        "celery.app.trace", trace.LOG_SUCCESS, id="t1", name=name, runtime=0.01, return_value=value
    )


@pytest.fixture
def celery_level():
    """Set the level the celery loggers see (via the ``celery`` parent logger)."""
    celery = logging.getLogger("celery")
    before = celery.level

    def set_level(level: int) -> None:
        celery.setLevel(level)

    yield set_level
    celery.setLevel(before)


@pytest.mark.parametrize("task", [beat_tasks.REAP_TASK, beat_tasks.DISPATCH_TASK])
def test_an_idle_tick_is_dropped_at_info(task: str, celery_level: Any):
    # Given Celery's loggers at INFO
    celery_level(logging.INFO)
    quiet = beat_tasks.QuietTicks()
    # Then the "received" and "succeeded ...: 0" lines of a beat job are dropped
    assert quiet.filter(received(task)) is False
    assert quiet.filter(succeeded(task, "0")) is False


def test_an_expired_tick_discarded_unrun_is_dropped_at_info(celery_level: Any):
    celery_level(logging.INFO)
    quiet = beat_tasks.QuietTicks()
    expired = logging.LogRecord(
        "celery.worker.request", logging.INFO, __file__, 1, beat_tasks.DISCARDED,
        (beat_tasks.REAP_TASK, "t1"), None,
    )  # fmt: skip
    state = logging.LogRecord(
        "celery.worker.request", logging.INFO, __file__, 1, beat_tasks.DISCARDED,
        ("leaseflow.orders.charge", "t2"), None,
    )  # fmt: skip
    assert quiet.filter(expired) is False
    assert quiet.filter(state) is True and state.levelno == logging.INFO


def test_an_idle_tick_is_shown_at_debug(celery_level: Any):
    celery_level(logging.DEBUG)
    record = received(beat_tasks.REAP_TASK)
    assert beat_tasks.QuietTicks().filter(record) is True
    assert (record.levelno, record.levelname) == (logging.DEBUG, "DEBUG")


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(succeeded(beat_tasks.REAP_TASK, "3"), id="a-tick-that-acted"),
        pytest.param(received("leaseflow.orders.charge"), id="a-state-received"),
        pytest.param(succeeded("leaseflow.orders.charge", "'committed: retry'"), id="a-state-ok"),
        pytest.param(received(beat_tasks.PROBE_TASK), id="a-probe"),
        pytest.param(
            celery_record(
                "celery.app.trace", trace.LOG_FAILURE, name=beat_tasks.REAP_TASK, exc="boom"
            ),
            id="a-tick-that-raised",
        ),
    ],
)
def test_other_lines_keep_their_level(record: logging.LogRecord, celery_level: Any):
    celery_level(logging.INFO)
    assert beat_tasks.QuietTicks().filter(record) is True
    assert record.levelno == logging.INFO


def test_registering_the_beat_jobs_installs_the_filter_once():
    from celery import Celery

    # When the beat jobs are registered on two apps
    for _ in range(2):
        beat_tasks.register(Celery("quiet_ticks_probe", set_as_current=False))
    # Then each of Celery's task loggers carries one QuietTicks filter
    for name in beat_tasks.CELERY_TASK_LOGGERS:
        filters = logging.getLogger(name).filters
        assert len([f for f in filters if isinstance(f, beat_tasks.QuietTicks)]) == 1
