"""The zero-overhead baseline: a plain Celery chord, no database.

``celery -A benchmarks.plain worker`` runs the app configured from ``LFBENCH_BROKER_URL``,
``LFBENCH_RESULT_BACKEND`` and ``LFBENCH_QUEUE``, with the Celery settings leaseflow
uses (JSON only, ``acks_late``, reject on worker lost, prefetch 1, task events).

``header(i)`` is a no-op that returns ``{"i", "t0", "t1"}`` (``time.time()`` at its
start and end); ``body(results, key, label)`` takes ``time.time()`` first, then
appends ``{"label", "start", "headers"}`` to the Redis list ``key`` (in the result
backend's db), where the benchmark reads it. Same host clock on both ends.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery

from leaseflow.tasks import celery_app

HEADER = "lfbench.plain.header"
BODY = "lfbench.plain.body"

_redis: tuple[int, Any] | None = None  # (pid, client): one client per pool process


def _recorder(url: str) -> Any:
    global _redis
    if _redis is None or _redis[0] != os.getpid():
        import redis

        _redis = (os.getpid(), redis.Redis.from_url(url))
    return _redis[1]


def make_app(broker_url: str, result_backend: str | None, queue: str) -> Celery:
    """A Celery app with leaseflow's settings and the two chord tasks."""
    app = Celery("lfbench_plain", set_as_current=False)
    # leaseflow's own settings; the chord header stores results (ignore_result=False below)
    app.conf.update(broker_url=broker_url, **celery_app.celery_settings(queue, result_backend))

    @app.task(name=HEADER, ignore_result=False, shared=False)
    def header(i: int) -> dict[str, float]:
        t0 = time.time()
        return {"i": i, "t0": t0, "t1": time.time()}

    @app.task(name=BODY, ignore_result=True, shared=False)
    def body(results: list[dict[str, float]], key: str, label: str) -> None:
        start = time.time()
        record = {"label": label, "start": start, "headers": results}
        _recorder(app.conf.result_backend).rpush(key, json.dumps(record))

    return app


app = make_app(
    os.environ.get("LFBENCH_BROKER_URL", "memory://"),
    os.environ.get("LFBENCH_RESULT_BACKEND") or None,
    os.environ.get("LFBENCH_QUEUE", "lfbench-plain"),
)
