"""Errors the API answers whatever the endpoint: 503 when the database is unreachable,
a JSON 500 naming a logged error id (never a traceback), JSON for unknown paths, and
an OpenAPI schema that declares them."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from leaseflow.api.app import create_app
from leaseflow.client import Client
from leaseflow.store import connections
from tests.api.conftest import LOCAL, NO_RUN, is_error


@pytest.fixture
def dead_http(settings, app, monkeypatch):
    """The API over a database that refuses connections (a closed port)."""
    monkeypatch.setattr(connections, "POOL_TIMEOUT", 1.0)
    dead = settings.model_copy(
        update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/test"}
    )
    with (
        Client(settings=dead, app=app) as client,
        TestClient(create_app(dead, client), client=LOCAL) as http,
    ):
        yield http


def test_an_unreachable_database_is_503_on_a_run_endpoint(dead_http):
    body = is_error(dead_http.get(f"/runs/{NO_RUN}"), 503, "E-STORE-UNAVAILABLE")
    assert "password" not in body["message"]
    is_error(dead_http.post("/runs", json={"workflow": "linear5"}), 503, "E-STORE-UNAVAILABLE")


def test_readyz_is_503_naming_the_database_when_it_is_unreachable(dead_http):
    ready = dead_http.get("/readyz")
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["database"].startswith("unreachable")
    assert checks["broker"] == "ok"


def test_healthz_answers_even_without_a_database(dead_http):
    assert dead_http.get("/healthz").status_code == 200


def test_an_unexpected_error_is_a_json_500_with_a_logged_error_id(api, caplog):
    # Given a route that fails in a way nobody planned for
    @api.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    # When it is called
    with TestClient(api, client=LOCAL) as http, caplog.at_level(logging.ERROR, "leaseflow"):
        response = http.get("/boom")
    # Then the answer names an error id and nothing else of the failure
    body = is_error(response, 500, "E-INTERNAL")
    error_id = body["detail"]["error_id"]
    assert error_id in body["message"]
    assert "secret internals" not in response.text and "RuntimeError" not in response.text
    # and the log has that id with the traceback
    [record] = [r for r in caplog.records if getattr(r, "action", None) == "api_error"]
    assert record.error_id == error_id and record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError


def test_an_unknown_path_or_method_is_a_json_error(http):
    is_error(http.get("/nowhere"), 404, "E-NOT-FOUND")
    is_error(http.put("/runs"), 405, "E-METHOD-NOT-ALLOWED")


def test_a_too_deeply_nested_body_is_422_not_500(http):
    deep = "[" * 100_000 + "]" * 100_000
    response = http.post(
        "/runs",
        content=f'{{"workflow": "linear5", "input": {{"x": {deep}}}}}',
        headers={"content-type": "application/json"},
    )
    is_error(response, 422, "E-REQUEST-INVALID")


def test_the_openapi_declares_the_errors_of_every_endpoint(api):
    spec = api.openapi()
    error_ref = "#/components/schemas/ErrorOut"
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            declared = operation["responses"]
            assert "500" in declared, (method, path)
            if path == "/healthz":
                continue
            assert "401" in declared, (method, path)
            schema = declared["401"]["content"]["application/json"]["schema"]
            assert schema == {"$ref": error_ref}, (method, path)
            if path != "/readyz":
                assert declared["503"]["content"]["application/json"]["schema"] == {
                    "$ref": error_ref
                }
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
