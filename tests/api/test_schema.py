"""Property-based: schemathesis generates requests for every operation of the app's
own OpenAPI schema (in-process, ASGI), authenticated as an admin, and checks that no
answer is a server error, that every status is declared and that every body conforms
to its declared schema.

Besides wholly generated requests, each run operation is also called with the ids of
real runs (pending, cancelled, completed) and ``POST /runs`` with a declared
workflow, so generated values reach the engine, not only its 404s.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

#: Generated cases per operation and strategy.
MAX_EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


def real_runs(http, headers, complete) -> list[str]:
    """A pending, a cancelled and a completed run."""
    ids = []
    for _ in range(3):
        response = http.post("/runs", json={"workflow": "linear5"}, headers=headers)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    assert http.post(f"/runs/{ids[1]}/cancel", headers=headers).status_code == 200
    complete(ids[2])
    return ids


def with_run(strategy, run_ids: list[str]):
    def pin(pair: tuple[Any, str]) -> Any:
        case, run_id = pair
        case.path_parameters = {**(case.path_parameters or {}), "run_id": run_id}
        return case

    return st.tuples(strategy, st.sampled_from(run_ids)).map(pin)


def with_workflow(strategy):
    def named(case: Any) -> Any:
        if isinstance(case.body, dict):
            case.body = {**case.body, "workflow": "linear5"}
            case.body.pop("version", None)
        return case

    return strategy.map(named)


def exercise(
    strategy: Any,
    label: str,
    headers: dict[str, str],
    cases: Counter[str],
    failures: list[tuple[str, int, str]],
    statuses: Counter[int],
) -> None:
    """Call ``MAX_EXAMPLES`` generated cases of one operation; count them and record
    every failed check (the run goes on, so one report lists every failure)."""

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def call(case: Any) -> None:
        cases[label] += 1
        response = case.call(headers=dict(headers))  # call() adds to the dict it gets
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=dict(headers))
        except (Exception, BaseExceptionGroup) as exc:  # recorded: all listed at the end
            failures.append((label, response.status_code, str(exc)))

    call()


def test_no_server_error_and_no_schema_violation(api, http, admin_token, complete, capsys):
    # Given runs in each kind of status, and the app's schema
    run_ids = real_runs(http, admin_token, complete)
    schema = schemathesis.openapi.from_asgi("/openapi.json", api)
    cases: Counter[str] = Counter()
    failures: list[tuple[str, int, str]] = []
    statuses: Counter[int] = Counter()

    # When every operation is called with generated requests
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        strategies = [operation.as_strategy()]
        if "{run_id}" in operation.path:
            strategies.append(with_run(operation.as_strategy(), run_ids))
        if label == "POST /runs":
            strategies.append(with_workflow(operation.as_strategy()))
        for strategy in strategies:
            exercise(strategy, label, admin_token, cases, failures, statuses)

    # Then none failed
    total = sum(cases.values())
    with capsys.disabled():
        print(f"\nschemathesis: {total} generated cases over {len(cases)} operations")
        for label, count in sorted(cases.items()):
            print(f"  {count:4d}  {label}")
        print(f"schemathesis: answers by status {dict(sorted(statuses.items()))}")
        server_errors = sum(status >= 500 for _, status, _ in failures)
        print(
            f"schemathesis: {server_errors} server errors, "
            f"{len(failures) - server_errors} schema violations"
        )
    assert len(cases) == 15  # every operation of the schema
    assert total >= 14 * MAX_EXAMPLES
    listed = [f"{op} -> {status}: {why}" for op, status, why in failures[:20]]
    assert failures == [], "\n".join(listed)
