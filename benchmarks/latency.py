"""W2 latency under load (open loop): Poisson arrivals of 5-state runs at a fixed rate;
state-to-state (hop) and end-to-end latency, leaseflow vs a plain Celery chain.

Two systems, each on its own real ``celery worker`` subprocess (prefork -c 2, JSON,
acks_late, prefetch 1, no result backend) on the same Redis server and scratch db, back
to back (the order rotated every round), fed the *same* seeded arrival schedule:

  leaseflow     ``benchmarks/workflows.py`` ``linear_bench``: s1 -> ... -> s5 -> Complete,
                on a fresh migrated database; each run started with ``Client.start``.
  plain         the stock chain: ``chain(stamp.si() x 5)``, no database, Celery's
                defaults except ``acks_late``, prefetch 1 and no result backend (task
                events off: ``benchmarks.chains.make_app``); ``stamp`` (defined here; the
                worker runs ``celery -A benchmarks.latency``) takes ``time.time()`` at
                its start and end and pushes both with one Redis ``RPUSH``: the only
                instrumentation, which timing every hop needs. leaseflow runs with its
                own default (task events as the worker's ``-E`` says).

The schedule (``--seed``) is precomputed: exponential gaps at ``--rate`` runs/s for
``--seconds``. A sender thread starts each run at its scheduled time, never waiting for
any run to finish; behind schedule it sends at once (and the lag is reported). Before
the schedule, ``--probes`` runs go one at a time (the worker is up and warm); runs
scheduled within the first ``--warmup-s`` are sent but not measured. After the last
send, the benchmark waits up to ``--drain-timeout`` s for every run to finish.

Rate: ``--rate`` runs/s, else ``--load`` (default 0.5: W2's 50% point) x
``--w1-states-per-s`` (default 216.9, leaseflow's W1 figure in RESULTS.md) / 5 states,
i.e. 14.3 runs/s (71 states/s). The rate used is printed and in the JSON.

Metrics (per system; ms):
  hop       start(k+1) - end(k), k = 1..4. leaseflow: ``lf_steps.started_at`` (the claim)
            of seq k+1 minus ``finished_at`` (the commit) of seq k, database clock;
            plain: the ``time.time()`` stamps (host clock).
  e2e       scheduled send time -> end of the last state (leaseflow: s5's ``finished_at``).
  first     scheduled send time -> start of the first state (queueing and the send).
  send lag  the sender's own delay: send returned - scheduled.
Ratios leaseflow/plain of hop p50/p99 and e2e p50/p99; target (BENCHMARKS.md W2): hop
p99 <= 3x plain at 50% load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from typing import Any

from benchmarks.common import (
    W1_STATES_PER_S,
    CeleryWorker,
    Deadline,
    OpenLoopSender,
    Scratch,
    ScratchDatabase,
    ScratchRedis,
    Sent,
    clean_env,
    distribution,
    fingerprint,
    fingerprint_line,
    ignoring_sigint,
    log,
    percentile,
    poisson_offsets,
    ratio,
    rotated,
)

HELP = "W2: open-loop Poisson arrivals; hop and end-to-end latency, leaseflow vs plain chain"

STATES = 5
PROFILES = {"full": 60.0, "quick": 15.0}
SYSTEMS = ("leaseflow", "plain")
STAMP = "lfbench.latency.stamp"
#: The figures whose medians over rounds are compared leaseflow/plain.
COMPARED = (("hop", "p50"), ("hop", "p99"), ("e2e", "p50"), ("e2e", "p99"))


def _systems(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown systems {unknown}; choose from {SYSTEMS}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, help="arrival window s (full 60, quick 15)")
    p.add_argument("--quick", action="store_true", help="quick profile: 15 s per system")
    p.add_argument("--rate", type=float, help="runs/s (default: --load x --w1-states-per-s / 5)")
    p.add_argument("--load", type=float, default=0.5, help="fraction of W1 (default 0.5)")
    p.add_argument(
        "--w1-states-per-s",
        type=float,
        default=W1_STATES_PER_S,
        help=f"leaseflow's W1 states/s (default {W1_STATES_PER_S}, RESULTS.md)",
    )
    p.add_argument("--seed", type=int, default=2, help="arrival schedule seed (default 2)")
    p.add_argument("--warmup-s", type=float, help="unmeasured first s (default 5%% of window)")
    p.add_argument("--probes", type=int, default=3, help="closed-loop runs before (default 3)")
    p.add_argument("--rounds", type=int, default=1, help="rounds (order rotated); default 1")
    p.add_argument("--systems", type=_systems, default=list(SYSTEMS), help=",".join(SYSTEMS))
    p.add_argument("--concurrency", type=int, default=2, help="worker -c (default 2)")
    p.add_argument("--pool", default="prefork", help="worker -P (default prefork)")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="s to wait after sending")
    p.add_argument("--redis-db", type=int, help="Redis db to use (default: a free one, 15..1)")
    p.add_argument("--loglevel", default="WARNING", help="worker -l (default WARNING)")
    p.add_argument("--budget", type=float, default=1200.0, help="give up after this many s")


# -- the plain chain's worker app (``celery -A benchmarks.latency worker``) --------------

_recorders: dict[str, tuple[int, Any]] = {}  # url -> (pid, client): one per pool process


def _recorder(url: str) -> Any:
    entry = _recorders.get(url)
    if entry is None or entry[0] != os.getpid():
        import redis

        entry = (os.getpid(), redis.Redis.from_url(url))
        _recorders[url] = entry
    return entry[1]


def make_app(broker_url: str, queue: str) -> Any:
    """``benchmarks.chains``' stock app (events off) plus the ``stamp`` task:
    a no-op that pushes ``"<run> <k> <start> <end>"`` (``time.time()``) to the Redis
    list ``key`` in the broker's db, one ``RPUSH`` per task."""
    from benchmarks import chains

    app = chains.make_app(broker_url, queue)

    @app.task(name=STAMP, ignore_result=True, shared=False)
    def stamp(key: str, run: int, k: int) -> None:
        t0 = time.time()
        # the no-op state
        t1 = time.time()
        _recorder(app.conf.broker_url).rpush(key, f"{run} {k} {t0!r} {t1!r}")

    return app


_worker_app: Any = None


def __getattr__(name: str) -> Any:
    """``app`` is built on first use (by ``celery -A``), not when the CLI imports us."""
    global _worker_app
    if name == "app":
        if _worker_app is None:
            _worker_app = make_app(
                os.environ.get("LFBENCH_BROKER_URL", "memory://"),
                os.environ.get("LFBENCH_QUEUE", "lfbench-latency"),
            )
        return _worker_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the systems ---------------------------------------------------------------------------


class Record:
    """One measured run: its start/end per state (epoch s, in seq order)."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []


class System:
    """One system's open-loop round: set up, worker, probes, schedule, drain, records."""

    name: str

    def __init__(self, scratch: Scratch, redis: ScratchRedis, args: Any, tag: str) -> None:
        self.scratch = scratch
        self.redis = redis
        self.args = args
        self.queue = f"lfbench-lat-{self.name}-{redis.token}-{tag}"
        self.db: ScratchDatabase | None = None

    def worker(self, app: str, env: dict[str, str]) -> CeleryWorker:
        return self.scratch.worker(
            app, name=f"{self.name}-{self.queue[-4:]}", queue=self.queue, env=env, args=self.args
        )

    def setup(self) -> None:
        raise NotImplementedError

    def start_worker(self) -> CeleryWorker:
        raise NotImplementedError

    def send(self, i: int) -> Any:
        """Start run ``i`` of the schedule (negative: a probe); returns its handle."""
        raise NotImplementedError

    def finished(self) -> int:
        """Runs (probes included) whose last state has ended."""
        raise NotImplementedError

    def records(self, sent: list[Sent]) -> dict[int, Record]:
        """Schedule index -> its states' starts and ends (finished states only)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def run(self, offsets: list[float], warmup_s: float, deadline: Deadline) -> dict[str, Any]:
        self.setup()
        worker = self.start_worker()
        # probes, one at a time: the first waits for the worker to come up
        for n in range(self.args.probes):
            self.send(-1 - n)
            limit = time.monotonic() + (90.0 if n == 0 else 30.0)
            while self.finished() < n + 1:
                worker.check()
                deadline.check()
                if time.monotonic() > limit:
                    raise TimeoutError(f"{self.name}: probe run {n + 1} did not finish")
                time.sleep(0.02)
        probes = self.args.probes
        log(f"{self.name}: worker ready; {len(offsets)} runs over {self.args.seconds:.0f}s")
        sender = OpenLoopSender(offsets, self.send)
        self.scratch.defer(f"stop sender {self.name}", sender.stop)
        t0 = sender.start()
        while not sender.join(0.5):
            worker.check()
            deadline.check()
        sent_ok = sender.ok()
        drain_until = time.monotonic() + self.args.drain_timeout
        while self.finished() < probes + len(sent_ok) and time.monotonic() < drain_until:
            worker.check()
            deadline.check()
            time.sleep(0.1)
        drained_s = time.time() - t0 - (offsets[-1] if offsets else 0.0)
        worker.stop()
        records = self.records(sent_ok)
        self.close()
        return self._figures(sender, sent_ok, records, warmup_s, drained_s)

    def _figures(
        self,
        sender: OpenLoopSender,
        sent_ok: list[Sent],
        records: dict[int, Record],
        warmup_s: float,
        drained_s: float,
    ) -> dict[str, Any]:
        hops: list[float] = []
        e2e: list[float] = []
        first: list[float] = []
        measured = incomplete = 0
        for s in sent_ok:
            if s.scheduled - sender.t0_wall < warmup_s:
                continue
            measured += 1
            rec = records.get(s.index)
            if rec is None or len(rec.ends) < STATES:
                incomplete += 1
                continue
            first.append((rec.starts[0] - s.scheduled) * 1000)
            e2e.append((rec.ends[-1] - s.scheduled) * 1000)
            hops.extend((rec.starts[k + 1] - rec.ends[k]) * 1000 for k in range(STATES - 1))
        errors = sender.errors()
        return {
            "runs_scheduled": len(sender.offsets),
            "runs_sent": len(sent_ok),
            "send_errors": len(errors),
            "send_error_first": errors[0] if errors else None,
            "measured_runs": measured,
            "incomplete_runs": incomplete,
            "achieved_runs_per_s": (
                round(len(sent_ok) / self.args.seconds, 2) if self.args.seconds else None
            ),
            "drain_after_last_send_s": round(drained_s, 2),
            "hop_ms": distribution(hops),
            "e2e_ms": distribution(e2e),
            "first_state_ms": distribution(first),
            "send_lag_ms": distribution(sender.lag_ms()),
        }


class LeaseflowSystem(System):
    name = "leaseflow"

    def setup(self) -> None:
        import psycopg

        from benchmarks import workflows
        from leaseflow.client import Client
        from leaseflow.settings import Settings

        db = ScratchDatabase()
        self.scratch.defer(f"drop database {db.name}", db.drop)
        self.db = db
        db.migrate()
        settings = Settings(
            database_url=db.sqlalchemy_url,
            broker_url=self.redis.url,
            default_queue=self.queue,
            workflows=["benchmarks.workflows"],
        )
        self.env = clean_env(
            LEASEFLOW_DATABASE_URL=db.sqlalchemy_url,
            LEASEFLOW_BROKER_URL=self.redis.url,
            LEASEFLOW_DEFAULT_QUEUE=self.queue,
            LEASEFLOW_WORKFLOWS="benchmarks.workflows",
        )
        self.client = Client(settings=settings)
        self.scratch.defer("close client", self.client.close)
        self.workflow = workflows.linear_bench
        self.conn = psycopg.connect(db.url, autocommit=True)
        self.scratch.defer("close connection", self.conn.close)

    def start_worker(self) -> CeleryWorker:
        return self.worker("leaseflow.tasks", self.env)

    def send(self, i: int) -> str:
        return self.client.start(self.workflow, {})

    def finished(self) -> int:
        row = self.conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'completed'),"
            " count(*) FILTER (WHERE status NOT IN ('pending', 'running', 'completed'))"
            " FROM lf_runs"
        ).fetchone()
        done, other = row if row is not None else (0, 0)
        if other:
            raise RuntimeError(f"leaseflow: {other} runs ended other than completed")
        return int(done)

    def records(self, sent: list[Sent]) -> dict[int, Record]:
        index = {s.value: s.index for s in sent}
        out: dict[int, Record] = {}
        rows = self.conn.execute(
            "SELECT run_id::text, extract(epoch FROM started_at)::float8,"
            " extract(epoch FROM finished_at)::float8 FROM lf_steps"
            " WHERE outcome IN ('next', 'completed') ORDER BY run_id, seq"
        ).fetchall()
        for run_id, started, finished in rows:
            i = index.get(run_id)
            if i is None:
                continue  # a probe
            rec = out.setdefault(i, Record())
            rec.starts.append(started)
            rec.ends.append(finished)
        return out

    def close(self) -> None:
        self.client.close()
        self.conn.close()


class PlainSystem(System):
    name = "plain"

    def setup(self) -> None:
        self.key = f"lfbench:{self.redis.token}:{self.queue}:stamps"
        self.env = clean_env(LFBENCH_BROKER_URL=self.redis.url, LFBENCH_QUEUE=self.queue)
        self.app = make_app(self.redis.url, self.queue)
        self.scratch.defer("close plain app", self.app.close)
        self.stamp = self.app.tasks[STAMP]

    def start_worker(self) -> CeleryWorker:
        return self.worker("benchmarks.latency", self.env)

    def send(self, i: int) -> int:
        from celery import chain

        links = [self.stamp.si(self.key, i, k) for k in range(1, STATES + 1)]
        chain(*links, app=self.app).apply_async()
        return i

    def finished(self) -> int:
        return int(self.redis.client.llen(self.key)) // STATES

    def records(self, sent: list[Sent]) -> dict[int, Record]:
        stamps: dict[int, list[tuple[int, float, float]]] = {}
        for raw in self.redis.client.lrange(self.key, 0, -1):
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            f_run, f_k, f_t0, f_t1 = text.split()
            if int(f_run) >= 0:  # negative: a probe
                stamps.setdefault(int(f_run), []).append((int(f_k), float(f_t0), float(f_t1)))
        out: dict[int, Record] = {}
        for run, items in stamps.items():
            rec = out.setdefault(run, Record())
            for _k, start, end in sorted(items):
                rec.starts.append(start)
                rec.ends.append(end)
        return out

    def close(self) -> None:
        self.app.close()


SYSTEM_CLASSES: dict[str, type[System]] = {"leaseflow": LeaseflowSystem, "plain": PlainSystem}


def run(args: Any) -> int:
    profile = "quick" if args.quick else "full"
    if args.seconds is None:
        args.seconds = PROFILES[profile]
    else:
        profile = f"{profile}+seconds={args.seconds:g}"
    rate = args.rate or args.load * args.w1_states_per_s / STATES
    rate_source = (
        "--rate"
        if args.rate
        else f"{args.load:g} x W1 {args.w1_states_per_s:g} states/s / {STATES} states"
    )
    warmup_s = args.warmup_s if args.warmup_s is not None else 0.05 * args.seconds
    fp = fingerprint()
    print(fingerprint_line(fp), flush=True)
    print(
        f"rate: {rate:.2f} runs/s = {rate * STATES:.1f} states/s ({rate_source});"
        f" {args.seconds:g} s per system, warm-up {warmup_s:g} s",
        flush=True,
    )
    began = time.monotonic()
    deadline = Deadline(args.budget, "latency benchmark")
    rounds: list[dict[str, Any]] = []
    with Scratch() as scratch:
        redis = scratch.redis(args.redis_db)
        for r in range(args.rounds):
            offsets = poisson_offsets(rate, args.seconds, args.seed + r)
            per: dict[str, Any] = {}
            for name in rotated(args.systems, r):
                system = SYSTEM_CLASSES[name](scratch, redis, args, f"r{r}")
                per[name] = system.run(offsets, warmup_s, deadline)
                log(
                    f"round {r + 1} {name}: hop {per[name]['hop_ms']}"
                    f" e2e {per[name]['e2e_ms']} incomplete {per[name]['incomplete_runs']}"
                )
                if system.db is not None:
                    with ignoring_sigint():
                        system.db.drop()
            rounds.append(per)
        with ignoring_sigint():
            log("stopping workers, dropping databases")
    report = _report(fp, args, profile, rate, rate_source, warmup_s, rounds, began)
    _print_table(report)
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return 0


def _median(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return None if not vals else round(percentile(vals, 50) or 0.0, 2)


def _report(
    fp: dict[str, Any],
    args: Any,
    profile: str,
    rate: float,
    rate_source: str,
    warmup_s: float,
    rounds: list[dict[str, Any]],
    began: float,
) -> dict[str, Any]:
    systems: dict[str, Any] = {}
    for name in args.systems:
        results = [rnd[name] for rnd in rounds if name in rnd]
        summary: dict[str, Any] = {}
        for metric in ("hop_ms", "e2e_ms", "first_state_ms", "send_lag_ms"):
            summary[metric] = {
                q: _median([x[metric][q] for x in results])
                for q in ("p50", "p90", "p99", "p999", "max")
            }
            summary[metric]["n"] = sum(int(x[metric]["n"]) for x in results)
        summary["incomplete_runs"] = sum(x["incomplete_runs"] for x in results)
        summary["send_errors"] = sum(x["send_errors"] for x in results)
        summary["runs_sent"] = sum(x["runs_sent"] for x in results)
        summary["rounds"] = results
        systems[name] = summary

    ratios: dict[str, float | None] = {}
    per_round: dict[str, list[float | None]] = {}
    if "leaseflow" in systems and "plain" in systems:
        lf, pl = systems["leaseflow"], systems["plain"]
        for metric, q in COMPARED:
            key = f"{metric}_{q}"
            ratios[key] = ratio(lf[f"{metric}_ms"][q], pl[f"{metric}_ms"][q])
            per_round[key] = [
                ratio(rnd["leaseflow"][f"{metric}_ms"][q], rnd["plain"][f"{metric}_ms"][q])
                for rnd in rounds
            ]
    hop_p99 = ratios.get("hop_p99")
    return {
        "benchmark": "W2-latency",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "profile": profile,
        "fingerprint": fp,
        "config": {
            "rate_runs_per_s": round(rate, 3),
            "rate_states_per_s": round(rate * STATES, 2),
            "rate_source": rate_source,
            "load": None if args.rate else args.load,
            "w1_states_per_s": None if args.rate else args.w1_states_per_s,
            "seconds": args.seconds,
            "warmup_s": round(warmup_s, 3),
            "probes": args.probes,
            "seed": args.seed,
            "arrivals": "poisson, precomputed, one sender thread, scheduled-time latency",
            "states_per_run": STATES,
            "rounds": args.rounds,
            "pool": args.pool,
            "concurrency": args.concurrency,
            "broker": "redis (scratch db)",
            "result_backend": None,
            "acks_late": True,
            "prefetch": 1,
            "drain_timeout_s": args.drain_timeout,
        },
        "systems": systems,
        "ratios": {f"leaseflow/plain {k}": v for k, v in ratios.items()},
        "ratios_per_round": {f"leaseflow/plain {k}": v for k, v in per_round.items()},
        "targets": {
            "hop_p99_le_3x_plain": None if hop_p99 is None else hop_p99 <= 3.0,
            "all_runs_complete": all(s["incomplete_runs"] == 0 for s in systems.values()),
        },
        "elapsed_s": round(time.monotonic() - began, 1),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.3g}"
    return str(value)


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = report["config"]
    table = Table(
        title=f"W2 latency (ms): Poisson {cfg['rate_runs_per_s']:g} runs/s"
        f" ({cfg['rate_states_per_s']:g} states/s) for {cfg['seconds']:g} s, 5 no-op states"
    )
    for column in (
        "system",
        "runs sent",
        "hops",
        "hop p50",
        "hop p90",
        "hop p99",
        "hop p99.9",
        "hop max",
        "e2e p50",
        "e2e p99",
        "e2e max",
        "first p50",
        "send lag p99",
        "incomplete",
    ):
        table.add_column(column, justify="left" if column == "system" else "right")
    for name, s in report["systems"].items():
        hop, e2e = s["hop_ms"], s["e2e_ms"]
        table.add_row(
            name,
            str(s["runs_sent"]),
            str(hop["n"]),
            _fmt(hop["p50"]),
            _fmt(hop["p90"]),
            _fmt(hop["p99"]),
            _fmt(hop["p999"]),
            _fmt(hop["max"]),
            _fmt(e2e["p50"]),
            _fmt(e2e["p99"]),
            _fmt(e2e["max"]),
            _fmt(s["first_state_ms"]["p50"]),
            _fmt(s["send_lag_ms"]["p99"]),
            str(s["incomplete_runs"]),
        )
    console = Console(width=160)
    console.print(table)
    if report["ratios"]:
        ratios = Table(title="latency ratios (same run; median over rounds)")
        ratios.add_column("ratio")
        ratios.add_column("value", justify="right")
        ratios.add_column("per round", justify="right")
        for name, value in report["ratios"].items():
            rounds = report["ratios_per_round"].get(name, [])
            ratios.add_row(
                name,
                _fmt(value) + "x" if value is not None else "-",
                ", ".join(_fmt(v) for v in rounds),
            )
        console.print(ratios)
    t = report["targets"]
    console.print(
        f"hop p99 <= 3x plain: {t['hop_p99_le_3x_plain']}; all runs complete: "
        f"{t['all_runs_complete']}"
    )
