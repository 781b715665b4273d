"""The service's dashboard: server-rendered pages, each for one tenant (signing in: web/serving.py).

/dashboard lists the tenant's jobs; /dashboard/jobs/{id} shows one job with a live loss chart and its
event log; /dashboard/adapters lists the adapters the tenant sees (its private ones and the public
ones), /dashboard/adapters/{namespace}/{name} one adapter's model card, versions, signature and
metrics (the cards of the service's adapters link here as their licence); /dashboard/leaderboard
ranks adapters per base model by their evaluation results.

A job's page, until the job ends, asks metrics.json for what is new every two seconds (the events
after the last one it has, by sequence number) and merges metrics into the chart by step, the latest
value of a step winning, as a worker that takes a job over repeats steps since the last checkpoint;
when the job's status changes the page reloads, to show what the new status brings. The chart is
Chart.js 4, vendored unchanged under static/ (static/VENDORED.txt says which build and its licence).

Each route is thin: who is signed in (a page without a tenant goes to the login form), one call to
the `Dashboard` serving object, one template.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from budwood.errors import BudwoodError, NotFoundError
from budwood.web.serving import COOKIE, HEADERS, STATIC_TYPES, Dashboard, root_of
from budwood.web.views import progress_text, safe_next

router = APIRouter(prefix="/dashboard", include_in_schema=False)
INLINE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                ".webp": "image/webp", ".md": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8",
                ".json": "text/plain; charset=utf-8", ".jsonl": "text/plain; charset=utf-8",
                ".csv": "text/plain; charset=utf-8", ".yaml": "text/plain; charset=utf-8"}


def dashboard_of(request: Request) -> Dashboard:
    return request.app.state.dashboard


def tenant_of(request: Request, dash: Annotated[Dashboard, Depends(dashboard_of)]) -> str | None:
    """The signed-in tenant, or None: each page then sends the browser to the login form."""
    return dash.signed_in(request)


DashboardDep = Annotated[Dashboard, Depends(dashboard_of)]
TenantDep = Annotated[str | None, Depends(tenant_of)]


@router.get("/login")
def login_form(request: Request, dash: DashboardDep, tenant: TenantDep,
               goto: str | None = Query(None, alias="next")):
    goto = safe_next(goto, root_of(request))
    if tenant:
        return RedirectResponse(goto, 303, headers=HEADERS)
    return dash.render(request, "login.html", None, error=None, next=goto)


@router.post("/login")
def login(request: Request, dash: DashboardDep, api_key: str = Form(""), goto: str = Form("", alias="next")):
    key = api_key.strip()
    tenant = dash.tenants.tenant_of(key) if key else None
    goto = safe_next(goto, root_of(request))
    if tenant is None:
        return dash.render(request, "login.html", None, 401, next=goto,
                           error="That API key is not valid (or it was revoked).")
    response = RedirectResponse(goto, 303, headers=HEADERS)
    response.set_cookie(COOKIE, key, httponly=True, samesite="strict", secure=request.url.scheme == "https",
                        path=root_of(request))
    return response


@router.post("/logout")
def logout(request: Request):
    response = RedirectResponse(f"{root_of(request)}/login", 303, headers=HEADERS)
    response.delete_cookie(COOKIE, path=root_of(request), httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
    return response


@router.get("")
def jobs(request: Request, dash: DashboardDep, tenant: TenantDep):
    if tenant is None:
        return dash.to_login(request)
    rows, more = dash.queue.list_jobs(tenant, limit=100)
    return dash.render(request, "jobs.html", tenant, jobs=rows, more=more, progress=progress_text)


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str, dash: DashboardDep, tenant: TenantDep):
    if tenant is None:
        return dash.to_login(request)
    try:
        page = dash.job_page(tenant, job_id)
    except NotFoundError:
        return dash.not_found(request, tenant, f"Fine-tuning job {job_id}")
    return dash.render(request, "job.html", tenant, **page)


@router.get("/jobs/{job_id}/metrics.json")
def job_metrics(job_id: str, dash: DashboardDep, tenant: TenantDep, after: int = Query(0, ge=0)):
    if tenant is None:
        return JSONResponse({"error": "not signed in"}, 401, headers=HEADERS)
    try:
        return JSONResponse(dash.job_metrics(tenant, job_id, after), headers=HEADERS)
    except NotFoundError:
        return JSONResponse({"error": "no such job"}, 404, headers=HEADERS)


@router.post("/jobs/{job_id}/cancel")
def cancel(request: Request, job_id: str, dash: DashboardDep, tenant: TenantDep):
    if tenant is None:
        return dash.to_login(request)
    try:
        dash.queue.cancel(tenant, job_id)
    except NotFoundError:
        return dash.not_found(request, tenant, f"Fine-tuning job {job_id}")
    except BudwoodError:
        pass  # it ended meanwhile: its page says how
    return RedirectResponse(f"{root_of(request)}/jobs/{quote(job_id)}", 303, headers=HEADERS)


@router.get("/adapters")
def adapters(request: Request, dash: DashboardDep, tenant: TenantDep):
    if tenant is None:
        return dash.to_login(request)
    return dash.render(request, "adapters.html", tenant, adapters=dash.adapters(tenant))


@router.get("/adapters/{namespace}/{name}")
def adapter_page(request: Request, namespace: str, name: str, dash: DashboardDep, tenant: TenantDep,
                 version: str | None = None):
    if tenant is None:
        return dash.to_login(request)
    info, chosen = dash.version_of(tenant, namespace, name, version)
    if chosen is None:
        return dash.not_found(request, tenant, f"Adapter {namespace}/{name}" + (f"@{version}" if version else ""))
    return dash.render(request, "adapter.html", tenant, info=info, version=chosen,
                       card_html=dash.card_html(request, info, chosen), metrics=sorted(chosen.metrics.items()))


@router.get("/adapters/{namespace}/{name}/files/{version}/{path:path}")
def adapter_file(request: Request, namespace: str, name: str, version: str, path: str, dash: DashboardDep,
                 tenant: TenantDep):
    if tenant is None:
        return dash.to_login(request)
    _, chosen = dash.version_of(tenant, namespace, name, version)
    entry = next((f for f in chosen.files if f.path == path), None) if chosen else None
    if entry is None:
        return dash.not_found(request, tenant, f"File {path} of {namespace}/{name}@{version}")
    inline = INLINE_TYPES.get(Path(path).suffix.lower())
    return FileResponse(dash.registry.store.path(entry.sha256), media_type=inline or "application/octet-stream",
                        filename=None if inline else Path(path).name,
                        headers={**HEADERS, "Cache-Control": "private, max-age=3600"})


@router.get("/leaderboard")
def leaderboard(request: Request, dash: DashboardDep, tenant: TenantDep, sort: str = "hallucination_rate",
                order: str | None = None):
    if tenant is None:
        return dash.to_login(request)
    return dash.render(request, "leaderboard.html", tenant, **dash.leaderboard(tenant, sort, order or ""))


@router.get("/static/{name}")
def static(name: str, dash: DashboardDep):
    path = dash.static_files.get(name)
    if path is None:
        return Response("not found", 404, media_type="text/plain", headers=HEADERS)
    return FileResponse(path, media_type=STATIC_TYPES[path.suffix],
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=300"})
