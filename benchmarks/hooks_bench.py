"""W1 with lifecycle hooks (``leaseflow_hooks`` in ``benchmarks/linear.py``): on
``linear_bench``, a hook that raises after every transition and one that sleeps 5 s
after every finished run. Imported by the worker through ``LEASEFLOW_WORKFLOWS``."""

from __future__ import annotations

import time

from benchmarks import workflows
from leaseflow import hooks

#: Seconds the slow hook sleeps.
SLOW = 5.0


@workflows.linear_bench.on_transition
def raising(event: hooks.Event) -> None:
    raise RuntimeError(f"a hook that always fails ({event.state})")


@workflows.linear_bench.on_run_finished
def sleeping(event: hooks.Event) -> None:
    time.sleep(SLOW)
