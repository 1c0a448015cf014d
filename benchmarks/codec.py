"""Checkpoint codec on a realistic agent context: stored size and CPU per checkpoint.

The fixture ``benchmarks/fixtures/agent_context.json`` is an agent's context as a run
would carry it: a system prompt (2.5 KB of instructions), 20 chat messages (user and
assistant, tool calls, code snippets) and 5 tool results as text (a log excerpt, a file
listing, a deploy API response, a search result list, a documentation page). It is
encoded with leaseflow's codec (``leaseflow.fsm.checkpoint.encode``) under the default
settings' ``max_checkpoint_bytes``, ``compress_min_bytes`` and ``compress_level`` (zstd
level 5), and the benchmark prints:

  raw JSON bytes   the compact JSON the codec compresses (what the size limit applies to)
  stored bytes     the checkpoint as written: codec byte, zstd frame, CRC-32
  ratio            stored / raw, PASS when <= 0.30 (issue 19, point 3)
  encode, decode   the codec's CPU per checkpoint (``time.process_time_ns`` around one
                   call), median and p90 over ``--reps`` calls after a warm-up, and the
                   wall time (``perf_counter``) median; encode includes ``check`` and
                   ``json.dumps`` (``encode_pack``: the zstd and CRC-32 part alone),
                   decode the CRC check and ``json.loads`` (``decode_unpack``: without
                   ``json.loads``)

``--levels 1,3,6`` adds what plain zstd at other levels would store (and cost to
compress) for the same JSON: a what-if for the codec, not what leaseflow writes.
Exit status 1 when the ratio is above the target. No service is needed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import log, percentile

HELP = "stored size and CPU per checkpoint of a realistic agent context (issue 19)"

FIXTURE = Path(__file__).parent / "fixtures" / "agent_context.json"
#: Stored bytes / raw JSON bytes the codec must reach on the fixture.
TARGET_RATIO = 0.30
WARMUP = 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reps", type=int, default=200, help="timed calls of encode and of decode")
    p.add_argument("--fixture", type=Path, default=FIXTURE, help="the context (a JSON object)")
    p.add_argument(
        "--levels", default="", help="what-if: zstd levels to compare, e.g. 1,3,6,9 (off)"
    )


def default_limits() -> tuple[int, int]:
    """``max_checkpoint_bytes`` and ``compress_min_bytes`` as the settings default them
    (not as the environment may override them)."""
    from leaseflow.settings import Settings

    fields = Settings.model_fields
    return fields["max_checkpoint_bytes"].default, fields["compress_min_bytes"].default


def default_level() -> int:
    """zstd's level as the settings default it (``LEASEFLOW_COMPRESS_LEVEL``)."""
    from leaseflow.settings import Settings

    return int(Settings.model_fields["compress_level"].default)


def load(path: Path = FIXTURE) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise SystemExit(f"codec: {path} does not hold a JSON object")
    return data


def sizes(data: dict[str, Any]) -> dict[str, Any]:
    """Raw and stored bytes of ``data`` under the default settings, and their ratio."""
    from leaseflow.fsm import checkpoint

    limit, compress_min = default_limits()
    raw = checkpoint.dumps(data, what="checkpoint", limit=limit)
    blob = checkpoint.encode(data, limit=limit, compress_min=compress_min, level=default_level())
    return {
        "raw_bytes": len(raw),
        "stored_bytes": len(blob),
        "codec": blob[0],
        "ratio": round(len(blob) / len(raw), 4),
        "limit": limit,
        "compress_min": compress_min,
    }


def _timed(call: Callable[[], Any], reps: int) -> dict[str, float]:
    """CPU (process time) and wall time of ``call`` in microseconds: median and p90."""
    for _ in range(WARMUP):
        call()
    cpu: list[float] = []
    wall: list[float] = []
    for _ in range(reps):
        c0, w0 = time.process_time_ns(), time.perf_counter_ns()
        call()
        w1, c1 = time.perf_counter_ns(), time.process_time_ns()
        cpu.append((c1 - c0) / 1000)
        wall.append((w1 - w0) / 1000)
    return {
        "cpu_us_median": round(statistics.median(cpu), 1),
        "cpu_us_p90": round(percentile(cpu, 90) or 0.0, 1),
        "wall_us_median": round(statistics.median(wall), 1),
    }


def timings(data: dict[str, Any], reps: int) -> dict[str, dict[str, float]]:
    from leaseflow.fsm import checkpoint

    limit, compress_min = default_limits()
    blob = checkpoint.encode(data, limit=limit, compress_min=compress_min, level=default_level())
    if checkpoint.decode(blob) != data:
        raise SystemExit("codec: the fixture does not round-trip")
    raw = checkpoint.dumps(data, what="checkpoint", limit=limit)
    return {
        "encode": _timed(
            lambda: checkpoint.encode(
                data, limit=limit, compress_min=compress_min, level=default_level()
            ),
            reps,
        ),
        # the part of encode after check and json.dumps: zstd and the CRC-32
        "encode_pack": _timed(
            lambda: checkpoint.pack(raw, compress_min=compress_min, level=default_level()), reps
        ),
        "decode": _timed(lambda: checkpoint.decode(blob), reps),
        # the part of decode before json.loads: the CRC-32 and zstd
        "decode_unpack": _timed(lambda: checkpoint.unpack(blob), reps),
    }


def what_if(data: dict[str, Any], levels: list[int], reps: int) -> list[dict[str, Any]]:
    """Plain zstd at ``levels`` on the same JSON: stored bytes (with leaseflow's 5 bytes
    of framing), ratio, CPU to compress."""
    import zstandard

    from leaseflow.fsm import checkpoint

    limit, _ = default_limits()
    raw = checkpoint.dumps(data, what="checkpoint", limit=limit)
    rows = []
    for level in levels:
        comp = zstandard.ZstdCompressor(level=level)
        stored = len(comp.compress(raw)) + 5
        cost = _timed(functools.partial(comp.compress, raw), reps)
        rows.append(
            {
                "level": level,
                "stored_bytes": stored,
                "ratio": round(stored / len(raw), 4),
                "compress_cpu_us_median": cost["cpu_us_median"],
            }
        )
    return rows


def _fingerprint() -> dict[str, Any]:
    import zstandard

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "zstandard": zstandard.__version__,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def run(args: Any) -> int:
    data = load(args.fixture)
    fp = _fingerprint()
    log(f"fingerprint: {fp}")
    size = sizes(data)
    cost = timings(data, args.reps)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    alternatives = what_if(data, levels, args.reps) if levels else []
    verdict = "PASS" if size["ratio"] <= TARGET_RATIO else "FAIL"
    parts = {
        "system_prompt_chars": len(data.get("system_prompt", "")),
        "messages": len(data.get("messages", [])),
        "tool_results": len(data.get("tool_results", [])),
    }
    print(f"fixture:        {args.fixture.name} {parts}")
    limits = (
        f"max_checkpoint_bytes={size['limit']} compress_min={size['compress_min']} "
        f"zstd level={default_level()}"
    )
    print(f"limits:         {limits}")
    print(f"raw JSON bytes: {size['raw_bytes']}")
    print(f"stored bytes:   {size['stored_bytes']} (codec {size['codec']})")
    print(f"ratio:          {size['ratio']:.4f} stored/raw -> {verdict} (target <= {TARGET_RATIO})")
    for op, t in cost.items():
        print(
            f"{op + ':':15}CPU {t['cpu_us_median']:.1f} us median (p90 {t['cpu_us_p90']:.1f}), "
            f"wall {t['wall_us_median']:.1f} us median, {args.reps} reps"
        )
    for alt in alternatives:
        print(
            f"what-if zstd -{alt['level']:<2}  stored {alt['stored_bytes']} bytes, "
            f"ratio {alt['ratio']:.4f}, compress CPU {alt['compress_cpu_us_median']:.1f} us"
        )
    print(
        json.dumps(
            {
                "benchmark": "codec",
                "fingerprint": fp,
                "config": {"reps": args.reps, "fixture": str(args.fixture.name)},
                "sizes": size,
                "verdict": verdict,
                "cpu": cost,
                "what_if": alternatives,
            }
        )
    )
    return 0 if verdict == "PASS" else 1
