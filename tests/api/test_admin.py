"""The operator endpoints: workflows, locks, workers, readiness."""

from __future__ import annotations

from leaseflow.store.records import WorkerInfo
from tests.api.conftest import is_error

KEY = "vectordb:acme/shard-1"


def test_workflows_lists_the_declared_workflows_with_versions(http):
    listed = http.get("/workflows")
    assert listed.status_code == 200, listed.text
    by_name = {wf["name"]: wf["versions"] for wf in listed.json()}
    assert by_name["linear5"] == [1]


def test_a_workflow_has_its_states_edges_and_mermaid(http):
    shown = http.get("/workflows/linear5")
    assert shown.status_code == 200, shown.text
    [version] = shown.json()["versions"]
    assert version["states"] == ["s1", "s2", "s3", "s4", "s5"]
    assert [None, "s1"] in version["edges"] and ["s1", "s2"] in version["edges"]
    assert version["mermaid"].startswith("stateDiagram")


def test_an_unknown_workflow_is_404(http):
    is_error(http.get("/workflows/nope"), 404, "E-UNKNOWN-WORKFLOW")


def test_locks_lists_a_held_lock_and_release_frees_it_audited(http, client, admin_token, db):
    # Given a lock held by a process outside any workflow
    client.engine_store.acquire_lock(KEY, holder="reindex-cli", ttl=60)
    # When an admin lists and releases it (the key holds ':' and '/')
    held = http.get("/locks", headers=admin_token)
    assert [(lock["key"], lock["holder"]) for lock in held.json()] == [(KEY, "reindex-cli")]
    freed = http.post(f"/locks/{KEY}/release", json={"reason": "stuck"}, headers=admin_token)
    # Then it is free, and the audit names the token as the actor
    assert freed.status_code == 200, freed.text
    assert (freed.json()["key"], freed.json()["actor"]) == (KEY, "ops")
    assert http.get("/locks", headers=admin_token).json() == []
    row = db.execute("SELECT action, actor, reason FROM lf_lock_audit WHERE key = %s", (KEY,))
    assert row.fetchone() == ("forced", "ops", "stuck")


def test_releasing_a_free_lock_is_404_and_without_reason_422(http, admin_token):
    missing = http.post("/locks/free:key/release", json={"reason": "x"}, headers=admin_token)
    is_error(missing, 404, "E-LOCK-NOT-FOUND")
    is_error(
        http.post(f"/locks/{KEY}/release", json={}, headers=admin_token), 422, "E-REQUEST-INVALID"
    )


def test_workers_lists_the_registry(http, client, admin_token):
    # Given a worker that checked in with a heartbeat
    info = WorkerInfo(("leaseflow",), 4)
    client.engine_store.heartbeat([], worker="host:42", ttl=60, info=info)
    # Then
    [worker] = http.get("/workers", headers=admin_token).json()
    assert (worker["id"], worker["queues"], worker["concurrency"]) == ("host:42", "leaseflow", 4)
    assert worker["status"] == "alive"


def test_readyz_checks_database_migrations_and_broker(http, admin_token):
    ready = http.get("/readyz", headers=admin_token)
    assert ready.status_code == 200, ready.text
    assert ready.json() == {
        "status": "ok",
        "checks": {"database": "ok", "migrations": "ok", "broker": "ok"},
    }
    is_error(http.get("/readyz"), 401, "E-AUTH-REQUIRED")


def test_readyz_is_503_when_the_schema_is_behind(http, db):
    db.execute("UPDATE lf_alembic_version SET version_num = '0007'")
    ready = http.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["migrations"].startswith("at 0007")
