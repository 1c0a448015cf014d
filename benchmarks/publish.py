"""Publishing one state's wake-up message, client side: stock Celery vs leaseflow.

Each variant publishes ``--messages`` messages to a scratch Redis db from this
process, one call per message (as a worker publishes the next state), with the
settings leaseflow runs with (JSON, task-sent events on); rounds alternate:

  celery      ``app.send_task`` on its own Celery app, as a chain link or any
              Celery producer publishes: kombu builds a new ``redis.Redis`` client
              for the LPUSH and another for the task-sent PUBLISH (redis-py #3624),
              two round trips
  leaseflow   ``leaseflow.tasks.dispatch.publish_all``: the message and its event in
              one kombu publish batch (one pipelined round trip), on a channel that
              reuses its client

``cpu ms`` is this process's CPU time per message (the part a worker's pool child
pays), ``wall ms`` the time per message.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from benchmarks.common import Scratch, fingerprint, fingerprint_line, log

HELP = "client CPU per published state message: stock Celery send_task vs leaseflow's publish"

VARIANTS = ("celery", "leaseflow")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--messages", type=int, default=3000, help="messages per variant and round")
    p.add_argument("--rounds", type=int, default=3)


def _app(broker: str, queue: str) -> Any:
    from celery import Celery

    from leaseflow.tasks import celery_app

    app = Celery(f"lfbench-publish-{queue}", set_as_current=False)
    app.conf.update(broker_url=broker, **celery_app.celery_settings(queue))
    return app


def _round(variant: str, app: Any, messages: int) -> dict[str, float]:
    from leaseflow import messages as wakeups
    from leaseflow.tasks import dispatch

    todo = [wakeups.StateStep(f"run-{i}", "bench", "s1", 1) for i in range(messages)]
    t0, c0 = time.perf_counter(), time.process_time()
    for d in todo:
        if variant == "celery":
            dispatch.publish(app, d)  # plain send_task from the app's own producer pool
        else:
            dispatch.publish_all(app, (d,))
    return {
        "cpu_ms": (time.process_time() - c0) / messages * 1e3,
        "wall_ms": (time.perf_counter() - t0) / messages * 1e3,
    }


def _reuses_client(app: Any) -> bool:
    with app.producer_or_acquire() as producer:
        return bool(getattr(producer.channel.Client, "reuses_clients", False))


def run(args: Any) -> int:
    from rich.console import Console
    from rich.table import Table

    fp = fingerprint()
    log(fingerprint_line(fp))
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    with Scratch() as scratch:
        redis = scratch.redis()
        # kombu shares producer pools between apps with the same broker URL: the stock
        # variant gets its own (another spelling of the host), so leaseflow's client
        # reuse never reaches it (checked after every round).
        stock_url = redis.url.replace("127.0.0.1", "localhost", 1)
        if stock_url == redis.url:
            raise SystemExit("publish: the scratch Redis URL must name 127.0.0.1")
        apps = {
            v: _app(stock_url if v == "celery" else redis.url, f"lfbench-publish-{v}")
            for v in VARIANTS
        }
        try:
            for r in range(args.rounds):
                for v in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
                    _round(v, apps[v], 50)  # warm: pools, queue declaration
                    redis.client.delete(apps[v].conf.task_default_queue)
                    results[v].append(_round(v, apps[v], args.messages))
                    if v == "celery" and _reuses_client(apps[v]):
                        raise SystemExit("publish: the stock variant reused a client")
                    redis.client.delete(apps[v].conf.task_default_queue)
                    log(f"round {r + 1} {v}: {results[v][-1]}")
        finally:
            for app in apps.values():
                app.close()
    summary = {
        v: {k: round(statistics.median(x[k] for x in rows), 3) for k in ("cpu_ms", "wall_ms")}
        for v, rows in results.items()
    }
    table = Table(title=f"publish: {args.messages} messages x {args.rounds} rounds (median)")
    for col in ("variant", "cpu ms/message", "wall ms/message"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for v, s in summary.items():
        table.add_row(v, f"{s['cpu_ms']:.3f}", f"{s['wall_ms']:.3f}")
    Console().print(table)
    ratio = round(summary["leaseflow"]["cpu_ms"] / summary["celery"]["cpu_ms"], 2)
    print(
        json.dumps(
            {
                "benchmark": "publish",
                "fingerprint": fp,
                "config": {"messages": args.messages, "rounds": args.rounds},
                "variants": summary,
                "rounds": results,
                "ratios": {"leaseflow/celery cpu": ratio},
            }
        )
    )
    return 0
