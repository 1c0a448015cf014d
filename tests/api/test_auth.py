"""Tokens and tenants through the HTTP API: 401 without a good token once any exists,
403 for a tenant's token on admin endpoints, and tenant isolation (another tenant's
run is 404, exactly like a run that does not exist)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.api.conftest import NO_RUN, bearer, is_error


def start(http, headers, **body) -> str:
    response = http.post("/runs", json={"workflow": "linear5", **body}, headers=headers)
    assert response.status_code == 201, response.text
    run_id: str = response.json()["id"]
    return run_id


# -- no token at all ------------------------------------------------------------------


def test_with_no_token_a_loopback_client_acts_as_admin(http):
    assert http.get("/locks").status_code == 200
    assert http.get("/workers").status_code == 200


def test_with_no_token_a_remote_client_is_refused_401(api):
    with TestClient(api, client=("203.0.113.9", 40000)) as remote:
        body = is_error(remote.get("/runs"), 401, "E-AUTH-REQUIRED")
    assert "loopback" in body["message"]


# -- 401 ------------------------------------------------------------------------------


def test_once_a_token_exists_a_request_without_one_is_401(http, admin_token):
    response = http.get("/runs")
    is_error(response, 401, "E-AUTH-REQUIRED")
    assert response.headers["www-authenticate"] == "Bearer"
    assert http.get("/runs", headers=admin_token).status_code == 200


def test_a_bad_or_malformed_token_is_401(http, admin_token):
    is_error(http.get("/runs", headers=bearer("lft_nope_nope")), 401, "E-AUTH-REQUIRED")
    is_error(http.get("/runs", headers=bearer("garbage")), 401, "E-AUTH-REQUIRED")
    forged = admin_token["Authorization"][:-3] + "xyz"
    is_error(http.get("/runs", headers={"Authorization": forged}), 401, "E-AUTH-REQUIRED")
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    is_error(http.get("/runs", headers=basic), 401, "E-AUTH-REQUIRED")


def test_a_revoked_token_is_401_at_once(http, tokens, admin_token, acme):
    # Given a token that worked a moment ago
    assert http.get("/runs", headers=acme).status_code == 200
    # When it is revoked
    assert tokens.revoke("acme-ci")
    # Then its very next request is refused
    is_error(http.get("/runs", headers=acme), 401, "E-AUTH-REQUIRED")
    is_error(http.post("/runs", json={"workflow": "linear5"}, headers=acme), 401, "E-AUTH-REQUIRED")


def test_healthz_needs_no_token(http, admin_token):
    assert http.get("/healthz").json() == {"status": "ok"}


def test_a_token_records_its_last_use(http, tokens, acme):
    assert http.get("/runs", headers=acme).status_code == 200
    [record] = [t for t in tokens.list() if t.name == "acme-ci"]
    assert record.last_used_at is not None


# -- 403 ------------------------------------------------------------------------------


def test_a_tenant_token_on_admin_endpoints_is_403(http, acme, admin_token):
    is_error(http.get("/locks", headers=acme), 403, "E-FORBIDDEN")
    is_error(http.get("/workers", headers=acme), 403, "E-FORBIDDEN")
    release = http.post("/locks/k/release", json={"reason": "x"}, headers=acme)
    is_error(release, 403, "E-FORBIDDEN")
    assert http.get("/locks", headers=admin_token).status_code == 200


def test_a_tenant_token_cannot_start_runs_in_another_tenant_403(http, acme):
    response = http.post("/runs", json={"workflow": "linear5", "tenant": "globex"}, headers=acme)
    is_error(response, 403, "E-FORBIDDEN")
    own = http.post("/runs", json={"workflow": "linear5", "tenant": "acme"}, headers=acme)
    assert own.status_code == 201 and own.json()["tenant"] == "acme"


# -- tenants --------------------------------------------------------------------------


def test_tenant_a_gets_404_for_tenant_b_runs_never_revealing_them(http, acme, globex):
    # Given a run of each tenant
    mine, theirs = start(http, acme), start(http, globex)
    # When acme asks for globex's run, and for a run that does not exist
    hidden = is_error(http.get(f"/runs/{theirs}", headers=acme), 404, "E-RUN-NOT-FOUND")
    absent = is_error(http.get(f"/runs/{NO_RUN}", headers=acme), 404, "E-RUN-NOT-FOUND")
    # Then both answers have the same shape: nothing says the first one exists
    assert hidden["detail"].keys() == absent["detail"].keys() == {"run_id"}
    assert hidden["message"].replace(theirs, "ID") == absent["message"].replace(NO_RUN, "ID")
    # and every action on it is 404 too
    for response in (
        http.post(f"/runs/{theirs}/signals", json={"event": "go"}, headers=acme),
        http.post(f"/runs/{theirs}/cancel", headers=acme),
        http.post(f"/runs/{theirs}/retry", headers=acme),
        http.delete(f"/runs/{theirs}", params={"force": True}, headers=acme),
        http.get(f"/runs/{theirs}/artifacts/x", headers=acme),
    ):
        is_error(response, 404, "E-RUN-NOT-FOUND")
    assert http.get(f"/runs/{mine}", headers=acme).json()["tenant"] == "acme"
    assert http.get(f"/runs/{theirs}", headers=globex).json()["status"] == "pending"


def test_a_tenant_lists_only_its_runs_and_an_admin_sees_every_tenant(
    http, acme, globex, admin_token
):
    mine, theirs = start(http, acme), start(http, globex)

    def listed(headers, **params) -> list[str]:
        response = http.get("/runs", params=params, headers=headers)
        assert response.status_code == 200, response.text
        return [run["id"] for run in response.json()["runs"]]

    assert listed(acme) == [mine]
    assert listed(acme, tenant="globex") == []
    assert listed(globex) == [theirs]
    assert listed(admin_token) == [theirs, mine]
    assert listed(admin_token, tenant="acme") == [mine]


def test_an_admin_starts_a_run_in_any_tenant(http, admin_token, globex):
    run_id = start(http, admin_token, tenant="globex")
    assert http.get(f"/runs/{run_id}", headers=globex).json()["tenant"] == "globex"
    assert http.get(f"/runs/{run_id}", headers=admin_token).json()["tenant"] == "globex"


def test_idempotency_keys_are_per_tenant(http, acme, globex):
    body = {"input": {"n": 1}, "idempotency_key": "k-1"}
    assert start(http, acme, **body) != start(http, globex, **body)
