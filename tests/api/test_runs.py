"""``/runs`` through the HTTP API: every endpoint on its success path and on each of
its declared errors (the app served from loopback with no token: an admin)."""

from __future__ import annotations

import base64

from fastapi.testclient import TestClient

import tests.workflows.artifacts  # noqa: F401  (declares artifact_reports)
from leaseflow.api.app import create_app
from leaseflow.client import Client
from tests.api.conftest import LOCAL, NO_RUN, is_error
from tests.workflows.artifacts import BINARY, REPORT


def start(http, workflow: str = "linear5", **body) -> dict:
    response = http.post("/runs", json={"workflow": workflow, **body})
    assert response.status_code == 201, response.text
    return response.json()


# -- POST /runs -----------------------------------------------------------------------


def test_start_creates_a_pending_run_201(http, client):
    # When
    run = start(http, input={"n": 3}, priority=4)
    # Then
    assert (run["status"], run["state"], run["tenant"], run["priority"]) == (
        "pending",
        "s1",
        "default",
        4,
    )
    assert run["input"] == {"n": 3}
    assert client.get(run["id"]).status == "pending"


def test_a_repeated_idempotency_key_answers_200_with_the_same_run(http):
    first = start(http, input={"n": 1}, idempotency_key="order-7")
    again = http.post(
        "/runs", json={"workflow": "linear5", "input": {"n": 1}, "idempotency_key": "order-7"}
    )
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first["id"]


def test_the_same_key_with_another_input_is_409(http):
    start(http, input={"n": 1}, idempotency_key="order-8")
    clash = http.post(
        "/runs", json={"workflow": "linear5", "input": {"n": 2}, "idempotency_key": "order-8"}
    )
    body = is_error(clash, 409, "E-IDEMPOTENCY-CONFLICT")
    assert body["detail"]["key"] == "order-8"


def test_an_unknown_workflow_is_404(http):
    body = is_error(http.post("/runs", json={"workflow": "nope"}), 404, "E-UNKNOWN-WORKFLOW")
    assert body["detail"]["name"] == "nope"


def test_input_the_context_model_refuses_is_422_context_invalid(http, db):
    response = http.post("/runs", json={"workflow": "linear5", "input": {"n": "many"}})
    is_error(response, 422, "E-CONTEXT-INVALID")
    assert db.execute("SELECT count(*) FROM lf_runs").fetchone()[0] == 0


def test_a_malformed_body_is_422_request_invalid(http):
    missing = is_error(http.post("/runs", json={"input": {}}), 422, "E-REQUEST-INVALID")
    assert missing["detail"]["errors"][0]["loc"] == ["body", "workflow"]
    is_error(
        http.post("/runs", content=b"{not json", headers={"content-type": "application/json"}),
        422,
        "E-REQUEST-INVALID",
    )
    is_error(
        http.post("/runs", json={"workflow": "linear5", "priority": 10}), 422, "E-REQUEST-INVALID"
    )


def test_oversized_input_and_signal_payload_are_413(settings, app):
    # Given an API whose payload limit is 200 bytes
    small = settings.model_copy(update={"max_payload_bytes": 200})
    limited = Client(settings=small, app=app)
    with limited, TestClient(create_app(small, limited), client=LOCAL) as http:
        # When / Then
        big = {"workflow": "linear5", "input": {"trail": ["x" * 300]}}
        body = is_error(http.post("/runs", json=big), 413, "E-PAYLOAD-TOO-LARGE")
        assert body["detail"]["limit"] == 200
        run = start(http)
        signal = http.post(f"/runs/{run['id']}/signals", json={"event": "go", "payload": "y" * 300})
        is_error(signal, 413, "E-PAYLOAD-TOO-LARGE")


# -- GET /runs ------------------------------------------------------------------------


def test_list_pages_newest_first_with_an_opaque_cursor(http):
    ids = [start(http, input={"n": i})["id"] for i in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = http.get("/runs", params=params)
        assert page.status_code == 200, page.text
        seen += [run["id"] for run in page.json()["runs"]]
        pages += 1
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert pages == 3


def test_list_filters_by_status_and_workflow(http):
    kept = start(http)["id"]
    gone = start(http)["id"]
    assert http.post(f"/runs/{gone}/cancel").status_code == 200
    cancelled = http.get("/runs", params={"status": "cancelled"}).json()["runs"]
    assert [r["id"] for r in cancelled] == [gone]
    pending = http.get("/runs", params={"status": "pending", "workflow": "linear5"}).json()
    assert [r["id"] for r in pending["runs"]] == [kept]
    assert http.get("/runs", params={"workflow": "slow3"}).json()["runs"] == []


def test_list_refuses_a_malformed_cursor_or_status_422(http):
    is_error(http.get("/runs", params={"cursor": "garbage!"}), 422, "E-REQUEST-INVALID")
    forged = base64.urlsafe_b64encode(b'["yesterday", "x"]').decode()
    is_error(http.get("/runs", params={"cursor": forged}), 422, "E-REQUEST-INVALID")
    is_error(http.get("/runs", params={"status": "sleeping"}), 422, "E-REQUEST-INVALID")
    is_error(http.get("/runs", params={"limit": 0}), 422, "E-REQUEST-INVALID")


# -- GET /runs/{id} -------------------------------------------------------------------


def test_show_has_the_step_log_of_a_completed_run(http, complete):
    run_id = start(http, input={"n": 2})["id"]
    complete(run_id)
    shown = http.get(f"/runs/{run_id}")
    assert shown.status_code == 200, shown.text
    run = shown.json()
    assert (run["status"], run["output"]) == (
        "completed",
        {"n": 2, "trail": ["s1", "s2", "s3", "s4", "s5"]},
    )
    assert [s["state"] for s in run["steps"]] == ["s1", "s2", "s3", "s4", "s5"]
    assert run["groups"] == [] and run["signals"] == [] and run["artifacts"] == []


def test_show_an_unknown_run_is_404(http):
    body = is_error(http.get(f"/runs/{NO_RUN}"), 404, "E-RUN-NOT-FOUND")
    assert body["detail"] == {"run_id": NO_RUN}
    is_error(http.get("/runs/not-a-uuid"), 404, "E-RUN-NOT-FOUND")


# -- signals, cancel, retry -----------------------------------------------------------


def test_a_signal_is_stored_and_delivered_once(http):
    run_id = start(http)["id"]
    sent = http.post(
        f"/runs/{run_id}/signals", json={"event": "go", "payload": {"ok": 1}, "signal_id": "s-1"}
    )
    assert sent.status_code == 200, sent.text
    assert (sent.json()["result"], sent.json()["run_status"]) == ("stored", "pending")
    again = http.post(f"/runs/{run_id}/signals", json={"event": "go", "signal_id": "s-1"})
    assert again.json()["result"] == "duplicate"
    signals = http.get(f"/runs/{run_id}").json()["signals"]
    assert [(s["signal_id"], s["payload"]) for s in signals] == [("s-1", {"ok": 1})]


def test_signalling_a_finished_run_is_409(http):
    run_id = start(http)["id"]
    http.post(f"/runs/{run_id}/cancel", json={"reason": "done with it"})
    body = is_error(
        http.post(f"/runs/{run_id}/signals", json={"event": "go"}), 409, "E-RUN-FINISHED"
    )
    assert body["detail"]["status"] == "cancelled"


def test_signalling_an_unknown_run_is_404_and_a_bad_event_422(http):
    is_error(http.post(f"/runs/{NO_RUN}/signals", json={"event": "go"}), 404, "E-RUN-NOT-FOUND")
    run_id = start(http)["id"]
    bad = http.post(f"/runs/{run_id}/signals", json={"event": "has space", "signal_id": "a b"})
    is_error(bad, 422, "E-SIGNAL-INVALID")


def test_cancel_is_at_once_then_idempotent_and_404_for_no_run(http):
    run_id = start(http)["id"]
    first = http.post(f"/runs/{run_id}/cancel", json={"reason": "test"})
    assert first.json() == {"run_id": run_id, "result": "cancelled", "run_status": "cancelled"}
    second = http.post(f"/runs/{run_id}/cancel")
    assert second.json()["result"] == "finished"
    is_error(http.post(f"/runs/{NO_RUN}/cancel"), 404, "E-RUN-NOT-FOUND")


def test_retry_re_drives_a_cancelled_run(http):
    run_id = start(http)["id"]
    http.post(f"/runs/{run_id}/cancel")
    retried = http.post(f"/runs/{run_id}/retry", json={"from_state": "s2"})
    assert retried.status_code == 200, retried.text
    assert retried.json() == {"run_id": run_id, "state": "s2"}
    assert http.get(f"/runs/{run_id}").json()["status"] == "pending"


def test_retry_of_an_active_or_completed_run_is_409(http, complete):
    active = start(http)["id"]
    is_error(http.post(f"/runs/{active}/retry"), 409, "E-RUN-ACTIVE")
    done = start(http)["id"]
    complete(done)
    is_error(http.post(f"/runs/{done}/retry"), 409, "E-RUN-COMPLETED")


def test_retry_from_an_unknown_state_is_422_and_an_unknown_run_404(http):
    run_id = start(http)["id"]
    http.post(f"/runs/{run_id}/cancel")
    is_error(
        http.post(f"/runs/{run_id}/retry", json={"from_state": "nowhere"}), 422, "E-UNKNOWN-STATE"
    )
    is_error(http.post(f"/runs/{NO_RUN}/retry"), 404, "E-RUN-NOT-FOUND")


# -- DELETE /runs/{id} ----------------------------------------------------------------


def test_delete_a_finished_run_says_what_was_deleted(http, complete):
    run_id = start(http)["id"]
    complete(run_id)
    deleted = http.delete(f"/runs/{run_id}")
    assert deleted.status_code == 200, deleted.text
    assert (deleted.json()["runs"], deleted.json()["steps"]) == (1, 5)
    assert deleted.json()["run_ids"] == [run_id]
    is_error(http.get(f"/runs/{run_id}"), 404, "E-RUN-NOT-FOUND")


def test_delete_an_active_run_is_409_unless_forced(http):
    run_id = start(http)["id"]
    is_error(http.delete(f"/runs/{run_id}"), 409, "E-RUN-ACTIVE")
    forced = http.delete(f"/runs/{run_id}", params={"force": "true"})
    assert forced.status_code == 200 and forced.json()["runs"] == 1
    is_error(http.delete(f"/runs/{run_id}"), 404, "E-RUN-NOT-FOUND")


# -- artefacts ------------------------------------------------------------------------


def test_an_artifact_is_served_with_its_bytes_and_content_type(http, complete):
    run_id = start(http, "artifact_reports")["id"]
    complete(run_id, "artifact_reports", "write")
    report = http.get(f"/runs/{run_id}/artifacts/report.txt")
    assert report.status_code == 200 and report.content == REPORT.encode()
    raw = http.get(f"/runs/{run_id}/artifacts/raw.bin")
    assert raw.content == BINARY
    assert raw.headers["content-type"] == "application/x-demo"
    listed = http.get(f"/runs/{run_id}").json()["artifacts"]
    assert [a["name"] for a in listed] == ["raw.bin", "report.txt"]


def test_an_unknown_artifact_or_run_is_404(http, complete):
    run_id = start(http, "artifact_reports")["id"]
    complete(run_id, "artifact_reports", "write")
    is_error(http.get(f"/runs/{run_id}/artifacts/nope/x.txt"), 404, "E-ARTIFACT-NOT-FOUND")
    is_error(http.get(f"/runs/{NO_RUN}/artifacts/report.txt"), 404, "E-RUN-NOT-FOUND")
