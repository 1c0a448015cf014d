"""One scenario per fault of ``tests/chaos/faults.py``: runs in flight, the fault,
healing, quiescence, then every invariant of ``tests/chaos/invariants.py``.

Run with ``pytest -m chaos`` (quick profile) or ``LEASEFLOW_CHAOS_PROFILE=long``.
"""

from __future__ import annotations

import pytest

from tests.chaos.faults import FAULTS, Fault
from tests.chaos.harness import Harness, current_profile, run_scenario

PROFILE = current_profile()

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(PROFILE.timeout_s)]


def _param(fault: Fault):
    marks = (
        [pytest.mark.xfail(strict=fault.xfail_strict, reason=fault.xfail)] if fault.xfail else []
    )
    return pytest.param(fault, id=fault.id, marks=marks)


@pytest.mark.parametrize("fault", [_param(f) for f in FAULTS.values()])
def test_invariants_hold_under_fault(fault: Fault, chaos: Harness, report) -> None:
    # Given a private Redis, a beat and two workers running a mix of runs
    if why := fault.unavailable():
        pytest.skip(f"{fault.id}: {why}")

    # When the fault strikes while runs are in flight, and is healed
    result = run_scenario(chaos, fault)
    report(result)

    # Then every invariant holds: no run lost, each completed (or failed as its fault
    # demands, by its lease holder), no effect twice, legal gap-free steps (inline ones
    # too), effects fenced by the committing lease, every join once, attempts in budget
    assert not result.violations and not result.problems, result.report(chaos.notable_lines())
