"""Two versions of one workflow side by side: new runs take the newest, and each
message carries its run's version's queue and time limits (one Celery task serves a
state in every version)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from leaseflow import Complete, Workflow
from leaseflow.fsm import registry
from leaseflow.tasks import dispatch
from leaseflow.testing import engine


class Data(BaseModel):
    pass


def declare(version: int, queue: str, timeout: float | None) -> Workflow:
    wf = Workflow("t_versions", context=Data, version=version)

    @wf.state(initial=True, queue=queue, timeout=timeout)
    def work(ctx: Any) -> Complete:
        return Complete(output=version)

    return wf


@pytest.fixture
def versions() -> Iterator[tuple[Workflow, Workflow]]:
    pair = (declare(1, "cpu", 5.0), declare(2, "gpu", None))
    yield pair
    for wf in pair:
        registry.unregister(wf)


def test_each_message_takes_its_version_s_queue_and_time_limits(versions):
    assert registry.versions("t_versions") == [1, 2]
    assert dispatch.queue_for("t_versions", "work", "default", 1) == "cpu"
    assert dispatch.queue_for("t_versions", "work", "default", 2) == "gpu"
    assert dispatch.queue_for("t_versions", "work", "default") == "gpu"  # the newest
    assert dispatch.time_limits("t_versions", "work", 1) == [15.0, 5.0]
    assert dispatch.time_limits("t_versions", "work", 2) == [None, None]
    assert dispatch.time_limits("t_versions", "work", 7) == [None, None]  # unknown: newest


def test_new_runs_take_the_newest_version_unless_told(versions):
    v1, v2 = versions
    with engine() as eng:
        newest = eng.start(v2)
        older = eng.start(v1)
        eng.run_until_idle()
        assert (eng.get(newest).version, eng.get(newest).output) == (2, 2)
        assert (eng.get(older).version, eng.get(older).output) == (1, 1)
    assert registry.get("t_versions").version == 2
    assert registry.get("t_versions", 1) is v1


def test_a_runner_without_a_run_s_version_leaves_it_pending(versions):
    v2 = versions[1]
    with engine() as eng:
        run_id = eng.start(v2)
        registry.unregister(v2)  # this "worker" only knows version 1
        step = eng.pending()[0]
        result = eng.runner.handle(step)
        assert result.result == "skipped" and result.wakeups == ()
        run = eng.get(run_id)
        assert (run.status, run.attempt) == ("pending", 0)
