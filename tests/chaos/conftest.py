"""The chaos suite runs only when asked: ``pytest -m chaos`` or ``LEASEFLOW_CHAOS=1``.

A plain ``pytest`` neither imports nor runs its modules (so the chaos workflows are
not declared in that process); any chaos item that still gets collected is
deselected. Each scenario's line is written as it ends, and the session ends with
the total line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported lazily: a plain run must not even declare the chaos workflows
    from tests.chaos.harness import Harness, Result

HERE = Path(__file__).resolve().parent
RESULTS: list[Result] = []


def chaos_requested(config: pytest.Config) -> bool:
    """``-m`` names the chaos marker (not negated), or ``LEASEFLOW_CHAOS=1``."""
    if os.environ.get("LEASEFLOW_CHAOS") == "1":
        return True
    expr = config.getoption("markexpr", default="") or ""
    return bool(re.search(r"\bchaos\b", expr)) and not re.search(r"\bnot\s+chaos\b", expr)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Not asked for: the chaos modules are not even imported (no workflows declared)."""
    if chaos_requested(config) or HERE not in collection_path.parents:
        return None
    if collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return True
    return None


def _is_chaos(item: pytest.Item) -> bool:
    return item.get_closest_marker("chaos") is not None or HERE in Path(item.path).parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if chaos_requested(config):
        return
    chosen = [item for item in items if _is_chaos(item)]
    if chosen:
        config.hook.pytest_deselected(items=chosen)
        items[:] = [item for item in items if not _is_chaos(item)]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not RESULTS:
        return
    from tests.chaos.harness import current_profile

    total = {
        key: sum(getattr(r, key) for r in RESULTS)
        for key in ("runs", "lost", "dup", "double_joins", "fenced_rejections")
    }
    terminalreporter.write_sep("-", f"chaos ({current_profile().name} profile)")
    terminalreporter.write_line(
        f"chaos total: faults={len(RESULTS)} runs={total['runs']} lost={total['lost']} "
        f"dup={total['dup']} double_joins={total['double_joins']} "
        f"fenced_rejections={total['fenced_rejections']}"
    )


@pytest.fixture
def chaos(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """A scenario's harness on a database cloned from the template, or on a private
    cluster when its fault stops the server; every process it started is gone after."""
    from tests.chaos.harness import current_profile, harness, private_postgres

    fault = getattr(getattr(request.node, "callspec", None), "params", {}).get("fault")
    if getattr(fault, "private_postgres", False):
        with (
            private_postgres(tmp_path / "pg") as server,
            harness(server.url, tmp_path, current_profile()) as h,
        ):
            h.postgres = server
            yield h
        return
    with harness(request.getfixturevalue("database_url"), tmp_path, current_profile()) as h:
        yield h


@pytest.fixture
def report(request: pytest.FixtureRequest):
    """Record a scenario's result and write its line at once (even under capture)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def write(result: Result) -> None:
        RESULTS.append(result)
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(result.line())
        else:  # pragma: no cover - no terminal (e.g. -p no:terminal)
            print(result.line())

    return write
