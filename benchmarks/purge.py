"""Retention under load: W1 drains while ``leaseflow purge`` deletes a large archive of
finished runs from the same tables.

Each system drains ``--runs`` W1 runs (``linear_bench``, 5 no-op states, prefork -c 2, as
``python -m benchmarks linear``) on a fresh database that also holds ``--archive``
finished runs 30 days old (``archived_bench``: 5 step rows each; every tenth with a
signal and an artefact), inserted by SQL and ``VACUUM ANALYZE``d before the drain:

  seeded    the archive stays: the rate of W1 next to a large table.
  purging   the same, and ``leaseflow purge --older-than 7d`` (the real CLI, its own
            process, batches of 500 runs, one short transaction each) starts as the
            worker takes its first message.

Printed per system and round: W1 states/s over the whole drain, and over the purge's
window (the states whose step ended between the purge's start and end; for ``seeded``
the same offsets from its own start), the purge's wall time and rows deleted per
second; then, for ``purging``: W1 runs all completed with all their steps, archive rows
left (0), orphans of any child table (0), and the sizes of the ``lf_`` tables after the
seed, after the purge and after a plain ``VACUUM``. The ratio ``purging / seeded`` of
the in-window rates is the figure (target: at least 0.80).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Deadline,
    Scratch,
    fingerprint,
    fingerprint_line,
    ignoring_sigint,
    log,
    ratio,
    rotated,
)
from benchmarks.linear import LeaseflowDrain

HELP = "W1 throughput while leaseflow purge deletes an archive of finished runs"

ARCHIVED = "archived_bench"
TABLES = ("lf_runs", "lf_steps", "lf_signals", "lf_artifacts", "lf_groups", "lf_branches")

#: The archive's runs are inserted finished, in their last state: an entry the guard knows.
DECLARE_ARCHIVED = f"""
INSERT INTO lf_transitions (workflow, version, from_state, to_state)
VALUES ('{ARCHIVED}', 1, '', 's5') ON CONFLICT DO NOTHING
"""

SEED = f"""
WITH runs AS (
    INSERT INTO lf_runs (id, workflow, version, state, prev_state, status, step_seq, attempt,
                         max_attempts, checkpoint, context_version, input, output,
                         created_at, updated_at, finished_at, not_before, redispatch_at)
    SELECT gen_random_uuid(), '{ARCHIVED}', 1, 's5', 's4', 'completed', 6, 1, 1,
           '\\x027b7d'::bytea, 1, '{{"customer": "c-1042", "lines": 3}}'::jsonb,
           '{{"ok": true}}'::jsonb, t, t, t + interval '2 seconds', t, t
      FROM (SELECT now() - interval '30 days' + i * interval '10 ms' AS t
              FROM generate_series(1, %(n)s) i) g
    RETURNING id, created_at
), steps AS (
    INSERT INTO lf_steps (run_id, seq, state, attempt, lease_token, worker, started_at,
                          finished_at, duration_ms, outcome, next_state, context_bytes,
                          checkpoint_bytes)
    SELECT id, s, 's' || s, 1, gen_random_uuid(), 'celery@archive:4242', created_at,
           created_at + s * interval '100 ms', 3, CASE WHEN s = 5 THEN 'completed' ELSE 'next'
           END, CASE WHEN s = 5 THEN NULL ELSE 's' || (s + 1) END, 40, 45
      FROM runs CROSS JOIN generate_series(1, 5) s
    RETURNING run_id, seq
), tenth AS (
    SELECT id FROM runs WHERE get_byte(uuid_send(id), 15) < 26
), signals AS (
    INSERT INTO lf_signals (run_id, signal_id, event, payload, consumed_at, consumed_seq)
    SELECT id, 'approve', 'review', '{{"approve": true}}'::jsonb, now() - interval '29 days', 3
      FROM tenth
    RETURNING run_id
)
INSERT INTO lf_artifacts (run_id, name, content_type, codec, data, size_bytes, stored_bytes,
                          sha256, state, step_seq, created_at)
SELECT id, 'report.txt', 'text/plain', 2, '\\x0268656c6c6f'::bytea, 5, 6,
       repeat('0', 64), 's3', 3, now() - interval '30 days'
  FROM tenth
"""

ORPHANS = """
SELECT (SELECT count(*) FROM lf_steps s WHERE NOT EXISTS
            (SELECT 1 FROM lf_runs r WHERE r.id = s.run_id))
     + (SELECT count(*) FROM lf_signals s WHERE NOT EXISTS
            (SELECT 1 FROM lf_runs r WHERE r.id = s.run_id))
     + (SELECT count(*) FROM lf_artifacts a WHERE NOT EXISTS
            (SELECT 1 FROM lf_runs r WHERE r.id = a.run_id))
     + (SELECT count(*) FROM lf_groups g WHERE NOT EXISTS
            (SELECT 1 FROM lf_runs r WHERE r.id = g.run_id))
     + (SELECT count(*) FROM lf_branches b WHERE NOT EXISTS
            (SELECT 1 FROM lf_groups g WHERE g.id = b.group_id))
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=4000, help="W1 runs per drain (default 4000)")
    p.add_argument(
        "--archive", type=int, default=100_000, help="finished runs to purge (default 100000)"
    )
    p.add_argument("--rounds", type=int, default=1, help="rounds (order rotated); default 1")
    p.add_argument("--concurrency", type=int, default=2, help="worker -c (default 2)")
    p.add_argument("--pool", default="prefork", help="worker -P (default prefork)")
    p.add_argument("--idle-s", type=float, default=1.0, help="idle-rate window before a drain")
    p.add_argument("--redis-db", type=int, help="Redis db to use (default: a free one)")
    p.add_argument("--loglevel", default="WARNING", help="worker -l (default WARNING)")
    p.add_argument("--budget", type=float, default=1800.0, help="give up after this many s")


class SeededDrain(LeaseflowDrain):
    """W1 on a database that also holds the archive."""

    name = "seeded"
    purges = False

    def enqueue(self, runs: int) -> None:
        super().enqueue(runs)
        t0 = time.monotonic()
        self.conn.execute(DECLARE_ARCHIVED)
        self.conn.execute(SEED, {"n": self.args.archive})
        self.conn.execute("VACUUM ANALYZE")
        log(
            f"{self.name}: {self.args.archive} archived runs seeded in {time.monotonic() - t0:.1f}s"
        )
        self.sizes = {"seeded": table_sizes(self.conn)}
        self.purge: dict[str, Any] = {}

    def wait_consuming(self, worker: Any, queued: int, deadline: Deadline) -> float:
        """The worker took its first message: the purge (``purging``) starts now."""
        consuming = super().wait_consuming(worker, queued, deadline)
        self.started_at = time.time()
        self.purger: subprocess.Popen[str] | None = None
        if self.purges:
            cli = Path(sys.executable).with_name("leaseflow")
            self.purger = subprocess.Popen(
                [str(cli), "purge", "--older-than", "7d", "--json"],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        return consuming

    def done(self) -> int:
        self.polls += 1
        ended = self.purger is not None and self.purger.poll() is not None
        if ended and "ended" not in self.purge:
            self.purge["ended"] = time.time()
        row = self.conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'completed'),"
            " count(*) FILTER (WHERE status NOT IN ('pending', 'running', 'completed'))"
            f" FROM lf_runs WHERE workflow <> '{ARCHIVED}'"
        ).fetchone()
        if row[1]:
            raise RuntimeError(f"{self.name}: {row[1]} W1 runs ended other than completed")
        return int(row[0])

    def finish(self) -> tuple[int, float | None]:
        row = self.conn.execute(
            "SELECT count(*), extract(epoch FROM max(s.finished_at))::float8"
            " FROM lf_steps s JOIN lf_runs r ON r.id = s.run_id"
            f" WHERE r.workflow <> '{ARCHIVED}' AND s.outcome <> 'lease_expired'"
        ).fetchone()
        return int(row[0]), row[1]

    def settle(self) -> dict[str, Any]:
        """After the drain: the purge's end and output, the window rates, the checks."""
        if self.purger is not None:
            out, err = self.purger.communicate(timeout=self.args.budget)
            self.purge.setdefault("ended", time.time())
            if self.purger.returncode != 0:
                raise RuntimeError(f"leaseflow purge exited {self.purger.returncode}: {err}")
            self.purge["report"] = json.loads(out)
            self.sizes["purged"] = table_sizes(self.conn)
            self.conn.execute("VACUUM")
            self.sizes["vacuumed"] = table_sizes(self.conn)
        left = self.conn.execute(
            f"SELECT count(*) FROM lf_runs WHERE workflow = '{ARCHIVED}'"
        ).fetchone()[0]
        return {
            "archive_left": left,
            "orphans": self.conn.execute(ORPHANS).fetchone()[0],
            "sizes": self.sizes,
            "purge": self.purge,
        }

    def window_rate(self, start: float, end: float) -> float | None:
        """W1 states per second whose step ended in ``[start, end]`` (Unix times)."""
        row = self.conn.execute(
            "SELECT count(*) FROM lf_steps s JOIN lf_runs r ON r.id = s.run_id"
            f" WHERE r.workflow <> '{ARCHIVED}'"
            " AND s.finished_at BETWEEN to_timestamp(%s) AND to_timestamp(%s)",
            (start, end),
        ).fetchone()
        return round(row[0] / (end - start), 1) if end > start else None


class PurgingDrain(SeededDrain):
    name = "purging"
    purges = True


DRAINS = {"seeded": SeededDrain, "purging": PurgingDrain}


def table_sizes(conn: Any) -> dict[str, Any]:
    """Per ``lf_`` table: ``pg_total_relation_size`` (heap, indexes, TOAST) in bytes and
    the live and dead rows the statistics count (``pg_stat_user_tables``)."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    out: dict[str, Any] = {}
    for t in TABLES:
        size = conn.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0]
        live, dead = conn.execute(
            "SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables WHERE relname = %s", (t,)
        ).fetchone()
        out[t] = {"bytes": int(size), "live": int(live), "dead": int(dead)}
    return out


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f}MB"


def run(args: Any) -> int:
    fp = fingerprint()
    print(fingerprint_line(fp), flush=True)
    deadline = Deadline(args.budget, "purge benchmark")
    rounds: list[dict[str, Any]] = []
    with Scratch() as scratch:
        redis = scratch.redis(args.redis_db)
        for r in range(args.rounds):
            drains: dict[str, SeededDrain] = {}
            per: dict[str, Any] = {}
            for name in rotated(list(DRAINS), r):
                drain = DRAINS[name](scratch, redis, args, f"r{r}")
                per[name] = drain.run(args.runs, deadline)
                per[name].update(drain.settle())
                drains[name] = drain
            purge = per["purging"]["purge"]
            offset, length = (
                drains["purging"].started_at,
                purge["ended"] - drains["purging"].started_at,
            )
            for name, drain in drains.items():
                start = drain.started_at if name == "seeded" else offset
                per[name]["window_s"] = round(length, 2)
                per[name]["window_states_per_s"] = drain.window_rate(start, start + length)
            per["ratio_in_window"] = ratio(
                per["purging"]["window_states_per_s"], per["seeded"]["window_states_per_s"]
            )
            per["ratio_whole_drain"] = ratio(
                per["purging"]["states_per_s"], per["seeded"]["states_per_s"]
            )
            rounds.append(per)
            _print_round(r, per, args)
            for drain in drains.values():
                if drain.db is not None:
                    with ignoring_sigint():
                        drain.db.drop()
    print(json.dumps({"fingerprint": fp, "rounds": rounds}, default=str), flush=True)
    return 0


def _print_round(r: int, per: dict[str, Any], args: Any) -> None:
    p, s = per["purging"], per["seeded"]
    report = p["purge"]["report"]
    deleted = sum(v for k, v in report.items() if isinstance(v, int) and k != "dry_run")
    print(f"\nround {r + 1}: W1 {args.runs} runs x 5 states, archive {args.archive} runs")
    print(
        f"  W1 states/s  seeded {s['states_per_s']}  purging {p['states_per_s']}  "
        f"ratio {per['ratio_whole_drain']} (whole drain)"
    )
    print(
        f"  in the purge's window ({p['window_s']} s): seeded {s['window_states_per_s']}  "
        f"purging {p['window_states_per_s']}  ratio {per['ratio_in_window']}"
    )
    print(
        f"  purge: {report} in {p['window_s']} s "
        f"({deleted / max(p['window_s'], 1e-9):.0f} rows/s, process start included)"
    )
    print(
        f"  W1 runs completed {p['runs']}/{args.runs}, steps {p['states']}; archive left "
        f"{p['archive_left']}; orphan rows {p['orphans']}"
    )
    for stage, sizes in p["sizes"].items():
        print(
            f"  sizes {stage:9s} "
            + "  ".join(
                f"{t} {_mb(v['bytes'])} ({v['live']}/{v['dead']})" for t, v in sizes.items()
            )
        )
    print("  (size (live rows/dead rows) by table; a plain VACUUM makes the space reusable)")
