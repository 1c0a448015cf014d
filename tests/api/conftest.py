"""Fixtures of the HTTP API tests: the app over the test's client (a real PostgreSQL
database and broker queue of its own), a TestClient calling from loopback, and
tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from leaseflow import messages
from leaseflow.api.app import create_app
from leaseflow.tokens import Tokens
from tests.integration.test_parallel import drive

#: The peer address of the test client: loopback (served without a token).
LOCAL = ("127.0.0.1", 50000)
#: A run id no run has.
NO_RUN = "00000000-0000-4000-8000-000000000000"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def is_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """The response is the JSON error ``code`` with ``status``; its body."""
    assert response.status_code == status, (response.status_code, response.text)
    body: dict[str, Any] = response.json()
    assert set(body) == {"code", "message", "detail"}, body
    assert body["code"] == code, body
    assert "Traceback" not in response.text
    return body


@pytest.fixture
def api(settings, client) -> FastAPI:
    return create_app(settings, client)


@pytest.fixture
def http(api: FastAPI) -> Iterator[TestClient]:
    with TestClient(api, client=LOCAL) as test_client:
        yield test_client


@pytest.fixture
def tokens(client) -> Tokens:
    return Tokens(client.engine_store)


@pytest.fixture
def admin_token(tokens: Tokens) -> dict[str, str]:
    return bearer(tokens.create("ops", admin=True))


@pytest.fixture
def acme(tokens: Tokens) -> dict[str, str]:
    return bearer(tokens.create("acme-ci", tenant="acme"))


@pytest.fixture
def globex(tokens: Tokens) -> dict[str, str]:
    return bearer(tokens.create("globex-ci", tenant="globex"))


@pytest.fixture
def complete(runner) -> Callable[[str, str], None]:
    """Drive a pending run to its end in this process (no worker needed)."""

    def run_to_end(run_id: str, workflow: str = "linear5", first: str = "s1") -> None:
        drive(runner, messages.StateStep(run_id, workflow, first, 1))

    return run_to_end
