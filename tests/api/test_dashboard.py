"""The dashboard's pages over HTTP (no browser): who may see them (the API's rule,
the token kept in an HttpOnly cookie), what they show, and that none is in the
OpenAPI schema."""

from __future__ import annotations

from fastapi.testclient import TestClient

from leaseflow.dashboard import access
from tests.api.conftest import LOCAL, NO_RUN

UI = access.PREFIX


def test_root_leads_to_the_runs_page(http, client, complete):
    # Given a completed run
    run_id = client.start("linear5", {"n": 1})
    complete(run_id)
    # When / is asked for
    response = http.get("/")
    # Then it leads to the runs page, which lists the run and counts it
    assert response.status_code == 200 and str(response.url).endswith(UI + "/")
    assert f'data-run="{run_id}" data-status="completed"' in response.text
    assert 'class="count status-completed' in response.text


def test_the_runs_list_filters_and_its_live_fragment_follows_the_filters(http, client, complete):
    done = client.start("linear5", {"n": 1})
    complete(done)
    pending = client.start("linear5", {"n": 2})
    page = http.get(UI + "/", params={"status": "pending"}).text
    assert pending in page and done not in page
    assert f'data-live="{UI}/runs-table?status=pending"' in page
    fragment = http.get(UI + "/runs-table", params={"status": "completed"})
    assert done in fragment.text and pending not in fragment.text
    assert "<html" not in fragment.text
    later = http.get(UI + "/", params={"since": "2999-01-01T00:00"}).text
    assert done not in later and pending not in later
    bad = http.get(UI + "/", params={"status": "asleep"})
    assert bad.status_code == 200 and "unknown status" in bad.text


def test_a_runs_page_shows_its_graph_steps_and_buttons(http, client, complete):
    run_id = client.start("linear5", {"n": 1})
    complete(run_id)
    page = http.get(f"{UI}/runs/{run_id}")
    assert page.status_code == 200
    assert 'class="node visited current status-completed" data-state="s5"' in page.text
    assert page.text.count('<tr class="outcome-') == 5
    assert 'data-action="cancel" class="danger" disabled' in page.text
    assert http.get(f"{UI}/runs/{NO_RUN}").status_code == 404
    assert http.get(f"{UI}/runs/not-a-uuid").status_code == 404


def test_operator_pages_render(http):
    for path, text in [
        ("/workflows", "linear5"),
        ("/locks", "No lock is held"),
        ("/workers", "Workers"),
    ]:
        response = http.get(UI + path)
        assert response.status_code == 200, path
        assert text in response.text, path
    assert "<svg" in http.get(UI + "/workflows", params={"name": "linear5"}).text
    assert http.get(UI + "/static/dashboard.css").status_code == 200


def test_with_a_token_the_pages_need_it_and_keep_it_in_a_cookie(http, admin_token):
    # Given a token exists: a page without one leads to the login form
    response = http.get(UI + "/workers", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == f"{UI}/login?next=/ui/workers"
    # When a wrong token is given, it is refused
    refused = http.post(f"{UI}/login?next=/ui/workers", data={"token": "lf_nope"})
    assert refused.status_code == 401 and "refused" in refused.text
    # When the right one is given, it is kept in an HttpOnly, SameSite=Strict cookie
    token = admin_token["Authorization"].removeprefix("Bearer ")
    done = http.post(f"{UI}/login?next=/ui/workers", data={"token": token}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == UI + "/workers"
    cookie = done.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
    # Then the pages are shown, and logging out forgets it
    assert http.get(UI + "/workers").status_code == 200
    http.post(UI + "/logout")
    assert http.get(UI + "/workers", follow_redirects=False).status_code == 303


def test_login_goes_nowhere_but_the_dashboard(http):
    done = http.post(f"{UI}/login?next=//evil.example/", data={"token": ""}, follow_redirects=False)
    assert done.headers["location"] == UI + "/"


def test_a_tenants_token_sees_its_runs_and_no_operator_page(api, client, acme, complete):
    mine = client.for_tenant("acme").start("linear5", {"n": 1})
    other = client.start("linear5", {"n": 2})
    with TestClient(api, client=LOCAL) as browser:
        token = acme["Authorization"].removeprefix("Bearer ")
        browser.post(UI + "/login", data={"token": token})
        page = browser.get(UI + "/", params={"tenant": "default"}).text
        assert mine in page and other not in page
        assert browser.get(f"{UI}/runs/{other}").status_code == 404
        assert browser.get(UI + "/locks").status_code == 403


def test_without_a_token_only_loopback_sees_the_pages(api):
    with TestClient(api, client=("203.0.113.9", 5000)) as remote:
        response = remote.get(UI + "/", follow_redirects=False)
    assert response.status_code == 303


def test_no_dashboard_path_is_in_the_openapi_schema(http):
    paths = http.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith(UI)]
