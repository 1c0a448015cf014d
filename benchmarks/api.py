"""The HTTP API under load on loopback, beside the same calls through the Python client.

``leaseflow serve --workers N`` (uvicorn, its own processes) runs on a fresh migrated
scratch database and a scratch Redis db, with an admin token (created first, so every
request is authenticated, as in production). Then, each for ``--seconds`` at a fixed
``--rate`` of Poisson arrivals (the same seeded schedule for every phase, open loop:
a late send is sent at once and its lateness counts, no coordinated omission):

  http POST /runs        start a run (``linear_bench``, empty input) over one keep-alive
                         ``httpx`` connection
  http GET /runs/{id}    read back the runs it started, with their step logs
  client start           ``Client.start`` of the same workflow in this process
  client get             ``Client.get`` of those runs

No worker consumes the queue: the runs stay pending (the API's work ends at the commit
and the publish). Printed per phase: requests, errors (any status but the expected one,
or an exception), p50 / p90 / p99 / max latency in ms (scheduled send to response), and
the achieved rate. The process's own CPU and the server's are context, not results.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    OpenLoopSender,
    Scratch,
    ScratchDatabase,
    clean_env,
    distribution,
    fingerprint,
    fingerprint_line,
    log,
    poisson_offsets,
)

HELP = "HTTP API latency (leaseflow serve) beside the Python client, fixed rate"
WORKFLOW = "linear_bench"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=50.0, help="requests per second (default 50)")
    p.add_argument("--seconds", type=float, default=60.0, help="per phase (default 60)")
    p.add_argument("--workers", type=int, default=2, help="leaseflow serve --workers (default 2)")
    p.add_argument("--port", type=int, default=8765, help="loopback port (default 8765)")
    p.add_argument("--redis-db", type=int, help="Redis db to use (default: a free one)")
    p.add_argument("--seed", type=int, default=7, help="the arrival schedule's seed")


class Server:
    """``leaseflow serve`` in its own process group; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, env: dict[str, str], port: int, workers: int, logs: Path) -> None:
        cli = Path(sys.executable).with_name("leaseflow")
        self.log = logs.open("w")
        self.proc = subprocess.Popen(
            [str(cli), "serve", "--port", str(port), "--workers", str(workers)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def _wait_ready(http: Any, deadline_s: float = 60.0) -> None:
    """Poll ``/readyz`` until the server answers 200."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if http.get("/readyz").status_code == 200:
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.2)
    raise RuntimeError("leaseflow serve never became ready")


def _phase(name: str, offsets: list[float], send: Any, seconds: float) -> dict[str, Any]:
    log(f"{name}: {len(offsets)} requests over {seconds:g}s")
    sender = OpenLoopSender(offsets, send)
    sender.start()
    if not sender.join(seconds * 3 + 60):
        sender.stop()
    lat = [(s.sent - s.scheduled) * 1000 for s in sender.sent if s.error is None]
    errors = sender.errors()
    span = (sender.sent[-1].sent - sender.t0_wall) if sender.sent else 0.0
    out = {
        "requests": len(sender.sent),
        "errors": len(errors),
        "first_errors": errors[:3],
        "latency_ms": distribution(lat),
        "achieved_rate": round(len(sender.sent) / span, 1) if span else None,
    }
    return out


def run(args: Any) -> int:
    import httpx

    from leaseflow.client import Client
    from leaseflow.settings import Settings
    from leaseflow.tokens import Tokens

    fp = fingerprint()
    print(fingerprint_line(fp), flush=True)
    offsets = poisson_offsets(args.rate, args.seconds, args.seed)
    report: dict[str, Any] = {"fingerprint": fp, "config": vars(args) | {"run": None}}
    with Scratch() as scratch:
        redis = scratch.redis(args.redis_db)
        db = ScratchDatabase()
        scratch.defer(f"drop database {db.name}", db.drop)
        db.migrate()
        queue = f"lfbench-api-{redis.token}"
        settings = Settings(
            database_url=db.sqlalchemy_url,
            broker_url=redis.url,
            default_queue=queue,
            workflows=["benchmarks.workflows"],
        )
        client = Client(settings=settings)
        scratch.defer("close client", client.close)
        token = Tokens(client.engine_store).create("bench", admin=True)
        env = clean_env(
            LEASEFLOW_DATABASE_URL=db.sqlalchemy_url,
            LEASEFLOW_BROKER_URL=redis.url,
            LEASEFLOW_DEFAULT_QUEUE=queue,
            LEASEFLOW_WORKFLOWS="benchmarks.workflows",
        )
        server = Server(env, args.port, args.workers, scratch.log_dir / "serve.log")
        scratch.defer("stop leaseflow serve", server.stop)
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{args.port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30.0,
        )
        scratch.defer("close http client", http.close)
        _wait_ready(http)
        from benchmarks import workflows

        http.post("/runs", json={"workflow": WORKFLOW, "input": {}})  # warm both paths
        client.get(client.start(workflows.linear_bench, {}))
        started: list[str] = []

        def http_post(i: int) -> None:
            r = http.post("/runs", json={"workflow": WORKFLOW, "input": {}})
            if r.status_code != 201:
                raise RuntimeError(f"POST /runs: {r.status_code} {r.text[:200]}")
            started.append(r.json()["id"])

        def http_get(i: int) -> None:
            r = http.get(f"/runs/{started[i % len(started)]}")
            if r.status_code != 200:
                raise RuntimeError(f"GET /runs/{{id}}: {r.status_code} {r.text[:200]}")

        mine: list[str] = []

        def client_start(i: int) -> None:
            mine.append(client.start(workflows.linear_bench, {}))

        def client_get(i: int) -> None:
            client.get(mine[i % len(mine)])

        phases = {
            "http POST /runs": http_post,
            "http GET /runs/{id}": http_get,
            "client start": client_start,
            "client get": client_get,
        }
        results = {name: _phase(name, offsets, send, args.seconds) for name, send in phases.items()}
    report["phases"] = results
    print()
    print(f"{'phase':22s} {'requests':>8s} {'errors':>6s} {'p50':>7s} {'p90':>7s} {'p99':>7s} "
          f"{'max':>7s} {'rate/s':>7s}")  # fmt: skip
    for name, r in results.items():
        lat = r["latency_ms"]
        print(
            f"{name:22s} {r['requests']:8d} {r['errors']:6d} {lat['p50']!s:>7s} "
            f"{lat['p90']!s:>7s} {lat['p99']!s:>7s} {lat['max']!s:>7s} {r['achieved_rate']!s:>7s}"
        )
    print(f"(latency ms from the scheduled send; {args.rate:g}/s for {args.seconds:g}s per phase,"
          f" serve --workers {args.workers})")  # fmt: skip
    print(json.dumps(report, default=str), flush=True)
    return 0 if all(r["errors"] == 0 for r in results.values()) else 1
