"""``leaseflow serve`` and ``leaseflow tokens``, run in-process against the test's
database (uvicorn itself is replaced: these tests check what serve decides)."""

from __future__ import annotations

import json
import os

import pytest

from leaseflow import cli_serve
from leaseflow.settings import reset_settings
from leaseflow.tokens import Tokens
from tests.integration.test_cli import Cli, bare_cli, cli, failed_cleanly, ok

__all__ = ["bare_cli", "cli"]  # the fixtures this module uses


@pytest.fixture
def served(monkeypatch):
    """Every uvicorn.run call serve makes, instead of serving; the environment serve
    exports for uvicorn's workers is put back afterwards."""
    import uvicorn

    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    saved = dict(os.environ)
    yield calls
    os.environ.clear()
    os.environ.update(saved)
    reset_settings()


def test_serve_refuses_a_non_loopback_host_without_tokens(cli: Cli, served):
    result = cli("serve", "--host", "0.0.0.0")
    message = failed_cleanly(result, "E-SERVE-UNPROTECTED")
    assert "refusing to serve on 0.0.0.0" in message and "tokens create" in message
    assert served == []


def test_serve_binds_loopback_without_tokens_and_says_so_first(cli: Cli, served):
    result = cli("serve", "--port", "8123", "--workers", "2")
    assert result.exit_code == 0, result.output
    first = result.stderr.splitlines()[0]
    assert first.startswith("leaseflow serve: http://127.0.0.1:8123 ")
    assert "loopback clients only" in first
    assert served == [
        {
            "app": "leaseflow.api.app:create_app",
            "factory": True,
            "host": "127.0.0.1",
            "port": 8123,
            "workers": 2,
            "log_level": "info",
        }
    ]


def test_serve_binds_anywhere_once_a_token_exists(cli: Cli, served, store):
    Tokens(store).create("ops", admin=True)
    result = cli("serve", "--host", "0.0.0.0")
    assert result.exit_code == 0, result.output
    assert "tokens required" in result.stderr.splitlines()[0]
    assert served[0]["host"] == "0.0.0.0"


def test_tokens_create_prints_the_token_once_and_list_never_shows_it(cli: Cli, store):
    token = ok(cli("tokens", "create", "--tenant", "acme", "--name", "ci")).strip()
    assert token.startswith("lft_")
    assert Tokens(store).verify(token).tenant == "acme"
    admin = ok(cli("tokens", "create", "--name", "ops", "--admin")).strip()
    assert Tokens(store).verify(admin).admin
    listed = json.loads(ok(cli("tokens", "list", "--json")))
    assert [(t["name"], t["tenant"], t["admin"]) for t in listed] == [
        ("ci", "acme", False),
        ("ops", "default", True),
    ]
    table = ok(cli("tokens", "list"))
    assert "ci" in table and token not in table and admin not in table


def test_tokens_revoke_and_a_name_that_is_not_there(cli: Cli, store):
    token = ok(cli("tokens", "create", "--name", "ci")).strip()
    assert "revoked token 'ci'" in ok(cli("tokens", "revoke", "ci"))
    assert Tokens(store).verify(token) is None
    failed_cleanly(cli("tokens", "revoke", "ci"), "E-TOKEN-NOT-FOUND")


def test_tokens_create_refuses_a_taken_name(cli: Cli):
    ok(cli("tokens", "create", "--name", "ci"))
    failed_cleanly(cli("tokens", "create", "--name", "ci"), "E-TOKEN-INVALID")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool):
    assert cli_serve.is_loopback(host) is loopback
