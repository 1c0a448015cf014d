"""The dashboard's pages under ``/ui`` (``/`` leads there): runs, a run, workflows,
locks, workers and the login. Server-rendered; none is in the OpenAPI schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from leaseflow import errors
from leaseflow.api import routes_runs
from leaseflow.dashboard import access, graph_svg, views
from leaseflow.dashboard.access import PREFIX, Reader, Viewer

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters.update(duration=views.duration, when=views.when, pretty=views.pretty)
templates.env.globals.update(PREFIX=PREFIX, STATUSES=views.STATUSES)

router = APIRouter(include_in_schema=False)


def page(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    context.setdefault("who", None)
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def problem(request: Request, who: Any, status_code: int, message: str) -> Response:
    return page(request, "problem.html", status_code, who=who, message=message)


@router.get("/")
def root() -> Response:
    return RedirectResponse(PREFIX + "/", status_code=307)


def _runs_context(request: Request, client: Any, who: Any) -> dict[str, Any]:
    query = dict(request.query_params)
    filters = views.Filters.parse(query)
    if not who.admin:
        filters.tenant = None  # a tenant's token sees its own runs only
    cursor = query.get("cursor")
    before = routes_runs.decode_cursor(cursor) if cursor else None
    runs, after = ([], None) if filters.problems else views.runs_page(client, filters, before)
    counts = {} if filters.problems else views.counts(client, filters)
    next_query = None
    if after is not None:
        next_query = filters.query(cursor=routes_runs.encode_cursor(*after))
    return {
        "who": who,
        "filters": filters,
        "runs": runs,
        "counts": counts,
        "next_query": next_query,
        "live_query": filters.query(cursor=cursor),
        "workflows": sorted({wf.name for wf in client.workflows()}),
        "nav": "runs",
    }


@router.get(PREFIX + "/")
def runs(request: Request, who: Viewer, client: Reader) -> Response:
    """Runs newest first with filters, counts by status and a live refresh."""
    return page(request, "runs.html", **_runs_context(request, client, who))


@router.get(PREFIX + "/runs-table")
def runs_table(request: Request, who: Viewer, client: Reader) -> Response:
    """The counts and the table alone: what the runs page's live refresh fetches."""
    return page(request, "_runs_table.html", **_runs_context(request, client, who))


@router.get(PREFIX + "/runs/{run_id}")
def run(run_id: str, request: Request, who: Viewer, client: Reader) -> Response:
    """A run: its graph, step timeline, groups, signals, artefacts and actions."""
    try:
        found = client.get(routes_runs.run_id_of(run_id))
    except errors.RunNotFound:
        return problem(request, who, 404, f"No run {run_id} (or not your tenant's).")
    fragment = request.query_params.get("fragment") == "1"
    return page(
        request,
        "_run_body.html" if fragment else "run.html",
        who=who,
        run=found,
        graph=views.run_graph(client, found),
        timeline=views.timeline(found),
        active=found.status in views.ACTIVE,
        nav="runs",
    )


@router.get(PREFIX + "/workflows")
def workflows(request: Request, who: Viewer, client: Reader) -> Response:
    """Every workflow declared here, with the graph of each version."""
    declared: dict[str, list[Any]] = {}
    for wf in client.workflows():
        declared.setdefault(wf.name, []).append(wf)
    shown = request.query_params.get("name")
    names = [(name, sorted(wf.version for wf in found)) for name, found in sorted(declared.items())]
    items = [
        {
            "name": name,
            "versions": [
                {"wf": wf, "graph": graph_svg.render(wf), "mermaid": client.describe(wf)["mermaid"]}
                for wf in sorted(found, key=lambda w: w.version)
            ],
        }
        for name, found in sorted(declared.items())
        if shown in (None, name)
    ]
    return page(
        request, "workflows.html", who=who, names=names, items=items, shown=shown, nav="workflows"
    )


@router.get(PREFIX + "/locks")
def locks(request: Request, who: Viewer, client: Reader) -> Response:
    """Locks held now with their holders, and the audit trail (admins)."""
    if not who.admin:
        return problem(request, who, 403, "Locks are shown to admin tokens only.")
    return page(
        request,
        "locks.html",
        who=who,
        locks=client.locks(limit=500),
        audit=client.lock_audit(limit=100),
        nav="locks",
    )


@router.get(PREFIX + "/workers")
def workers(request: Request, who: Viewer, client: Reader) -> Response:
    """The worker registry: queues, pool, leases, last check-in (admins)."""
    if not who.admin:
        return problem(request, who, 403, "Workers are shown to admin tokens only.")
    return page(request, "workers.html", who=who, workers=client.workers(limit=500), nav="workers")


@router.get(PREFIX + "/login")
def login_form(request: Request) -> Response:
    why = access.check(request, "")
    return page(
        request,
        "login.html",
        next=access.safe_next(request.query_params.get("next")),
        why=why,
        nav="login",
    )


@router.post(PREFIX + "/login")
async def login(request: Request) -> Response:
    """Check the pasted token and keep it in the dashboard's cookie."""
    token = await access.token_of(request)
    next_path = request.query_params.get("next") or PREFIX + "/"
    why = access.check(request, token)
    if why is not None:
        return page(
            request,
            "login.html",
            401,
            next=access.safe_next(next_path),
            why=why,
            failed=True,
            nav="login",
        )
    return access.logged_in(request, token, next_path)


@router.post(PREFIX + "/logout")
def logout() -> Response:
    return access.logged_out()
