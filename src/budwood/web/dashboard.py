"""The service's dashboard: server-rendered pages, each for one tenant.

/dashboard lists the tenant's jobs; /dashboard/jobs/{id} shows one job with a live loss chart and its
event log; /dashboard/adapters lists the adapters the tenant sees (its private ones and the public
ones), /dashboard/adapters/{namespace}/{name} one adapter's model card, versions, signature and
metrics (the cards of the service's adapters link here as their licence); /dashboard/leaderboard
ranks adapters per base model by their evaluation results.

The pages live outside /v1, where the bearer-key middleware does not look: the login form takes the
tenant's API key, and the browser keeps it in an HttpOnly, SameSite=Strict cookie (Secure over https)
that every request checks again with `Tenants.tenant_of`, so a revoked key signs the browser out at
once. SameSite=Strict keeps the cookie off cross-site requests, which is what guards the POST routes
(cancel, logout). Another tenant's job or adapter is answered 404, exactly as one that does not exist.

A job's page, until the job ends, asks metrics.json for what is new every two seconds (the events
after the last one it has, by sequence number) and merges metrics into the chart by step, the latest
value of a step winning, as a worker that takes a job over repeats steps since the last checkpoint;
when the job's status changes the page reloads, to show what the new status brings. The chart is
Chart.js 4, vendored unchanged under static/ (static/VENDORED.txt says which build and its licence).
"""
from __future__ import annotations

import math
import posixpath
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from budwood.jobs.protocol import TERMINAL, checkpoint_model
from budwood.jobs.queue import ServiceError
from budwood.registry.names import RegistryError

HERE = Path(__file__).parent
STATIC = HERE / "static"
COOKIE = "budwood_dashboard"
POLL_MS = 2000
LOG_ROWS = 300  # newest events shown in the log; the chart always has every step
MISSING = "—"
_COMMENT_LINES = re.compile(r"^[ \t]*<!--.*?-->[ \t]*\n?", re.S | re.M)  # invisible on the Hub too
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
           "X-Frame-Options": "DENY",
           "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                      "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"}
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".md": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8"}
INLINE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                ".webp": "image/webp", ".md": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8",
                ".json": "text/plain; charset=utf-8", ".jsonl": "text/plain; charset=utf-8",
                ".csv": "text/plain; charset=utf-8", ".yaml": "text/plain; charset=utf-8"}


@dataclass(frozen=True)
class Column:
    """A leaderboard column: `key` names it in ?sort=, `rank` maps a value to what is sorted (the
    distance from unbiased for the bias scores), `best` is the order that puts the best first."""

    key: str
    metric: str
    label: str
    note: str
    best: str
    rank: str = "value"

    def sort_value(self, value: float) -> float:
        return abs(value - 0.5) if self.rank == "from_half" else abs(value) if self.rank == "from_zero" else value


COLUMNS = (
    Column("hallucination_rate", "grounding.hallucination_rate", "Hallucination rate", "lower is better", "asc"),
    Column("mc1", "truthfulqa.mc1", "TruthfulQA MC1", "higher is better", "desc"),
    Column("crows_pairs_stereotype", "bias.crows_pairs_stereotype", "CrowS-Pairs stereotype",
           "50% is unbiased; sorted by distance from 50%", "asc", "from_half"),
    Column("bbq_bias_ambig", "bias.bbq_bias_ambig", "BBQ bias (ambiguous)", "0 is unbiased; sorted by distance from 0",
           "asc", "from_zero"),
    Column("token_f1", "domain.token_f1", "Domain token F1", "higher is better", "desc"),
    Column("determinism_greedy", "reproducibility.determinism_greedy", "Determinism (greedy)", "higher is better",
           "desc"),
)
OPTIONAL_COLUMNS = {"bbq_bias_ambig"}  # shown only when some adapter has it


# -- formatting ---------------------------------------------------------------------------------------------
def when(value: float | datetime | None) -> str:
    if value is None:
        return MISSING
    if isinstance(value, datetime):
        value = value.timestamp()
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))


def number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def size(value: int | None) -> str:
    if value is None:
        return MISSING
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:,} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=when, number=number, size=size)
    env.globals.update(MISSING=MISSING, TERMINAL=TERMINAL, checkpoint_model=checkpoint_model)
    return env


# -- what the pages show --------------------------------------------------------------------------------------
def loss_series(events) -> dict[str, list[list[float]]]:
    """Training and validation loss by step from a job's metrics events (oldest first), the latest
    value of a step winning."""
    series: dict[str, dict[int, float]] = {"train": {}, "valid": {}}
    for e in events:
        point = metrics_point(e)
        for name in series:
            if name in point:
                series[name][point["step"]] = point[name]
    return {name: [[step, loss] for step, loss in sorted(points.items())] for name, points in series.items()}


def metrics_point(e) -> dict:
    """{"step", "train" and/or "valid"} from a metrics event; {} for any other event."""
    data = e.data or {}
    if e.type != "metrics" or not isinstance(data.get("step"), int):
        return {}
    point: dict = {}
    for name, key in (("train", "train_loss"), ("valid", "valid_loss")):
        value = data.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            point[name] = float(value)
    return {"step": data["step"], **point} if point else {}


def event_row(e) -> dict:
    return {"seq": e.seq, "time": when(e.created_at), "level": e.level, "type": e.type, "message": e.message,
            **metrics_point(e)}


def progress_text(job) -> str:
    p = job.progress or {}
    if p.get("step") is None:
        return MISSING
    return f"{p['step']:,} / {p['total_steps']:,}" if p.get("total_steps") else f"{p['step']:,}"


def live_state(job) -> dict:
    """The parts of the job page that change while it runs."""
    p = job.progress or {}
    return {"status": job.status, "finished": job.status in TERMINAL, "progress": progress_text(job),
            "tokens_per_s": number(p.get("tokens_per_s"), 0),
            "estimated_finish": when(job.estimated_finish) if job.status == "running" else MISSING}


def strip_front_matter(text: str) -> str:
    """A card without its YAML metadata block (between the leading `---` lines)."""
    if not text.startswith("---"):
        return text
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines[1:], start=1):
        if line.rstrip() == "---":
            return "".join(lines[i + 1:])
    return text


def render_card(text: str, files_url: str, paths: set[str]) -> str:
    """The card's markdown as HTML: raw HTML in it is escaped (markdown-it's html=False) but for
    comments on lines of their own, which are dropped; tables rendered; links and images to the
    version's own files (loss.png) pointed at the file route."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
    tokens = md.parse(_COMMENT_LINES.sub("", strip_front_matter(text)))
    for token in tokens:
        for child in token.children or []:
            attr = "src" if child.type == "image" else "href" if child.type == "link_open" else None
            target = child.attrGet(attr) if attr else None
            if not target or urlsplit(target).scheme or target.startswith(("/", "#")):
                continue
            path = posixpath.normpath(urlsplit(target).path)
            if path in paths:
                child.attrSet(attr, f"{files_url}/{quote(path)}")
    return md.renderer.render(tokens, md.options, {})


def leaderboard(versions, sort: str, order: str) -> dict:
    """Per base model, one row per adapter (its latest version), sorted by a column; missing values last."""
    present = {m for v in versions for m in v.metrics}
    columns = [c for c in COLUMNS if c.key not in OPTIONAL_COLUMNS or c.metric in present]
    column = next((c for c in columns if c.key == sort), columns[0])
    order = order if order in ("asc", "desc") else column.best
    groups: dict[str, list] = {}
    for v in versions:
        groups.setdefault(v.base_model, []).append(v)

    def key(v):
        value = v.metrics.get(column.metric)
        if value is None or not math.isfinite(value):
            return (1, 0.0, v.id)
        ranked = column.sort_value(value)
        return (0, ranked if order == "asc" else -ranked, v.id)

    links = {c.key: f"?sort={c.key}&order={('desc' if order == 'asc' else 'asc') if c is column else c.best}"
             for c in columns}
    return {"columns": columns, "sort": column.key, "order": order, "links": links,
            "groups": [(base, sorted(rows, key=key)) for base, rows in sorted(groups.items())]}


def _safe_next(value: str | None, root: str) -> str:
    """Where to go after logging in: a dashboard path on this site, never another site."""
    if not value:
        return root
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or value.startswith(("//", "/\\")) or not (
            parts.path == root or parts.path.startswith(root + "/")):
        return root
    return value


# -- routes ---------------------------------------------------------------------------------------------------
def dashboard_router(service) -> APIRouter:
    router = APIRouter(prefix="/dashboard", include_in_schema=False)
    env = _environment()
    queue, registry, tenants = service.queue, service.registry, service.tenants
    static_files = {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in STATIC_TYPES}

    def root_of(request: Request) -> str:
        return request.scope.get("root_path", "") + "/dashboard"

    def render(request: Request, template: str, tenant: str | None, status: int = 200, **context) -> HTMLResponse:
        html = env.get_template(template).render(root=root_of(request), tenant=tenant, **context)
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    def not_found(request: Request, tenant: str, what: str) -> HTMLResponse:
        return render(request, "error.html", tenant, 404, title="Not found",
                      message=f"{what} does not exist, or it is not yours.")

    def signed_in(request: Request) -> str | None:
        key = request.cookies.get(COOKIE)
        return tenants.tenant_of(key) if key else None

    def to_login(request: Request) -> RedirectResponse:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{root_of(request)}/login?next={quote(here, safe='')}", 303, headers=HEADERS)

    def visible(tenant: str) -> frozenset[str]:
        return frozenset({tenant})

    @router.get("/login")
    def login_form(request: Request, goto: str | None = Query(None, alias="next")):
        goto = _safe_next(goto, root_of(request))
        if signed_in(request):
            return RedirectResponse(goto, 303, headers=HEADERS)
        return render(request, "login.html", None, error=None, next=goto)

    @router.post("/login")
    def login(request: Request, api_key: str = Form(""), goto: str = Form("", alias="next")):
        key = api_key.strip()
        tenant = tenants.tenant_of(key) if key else None
        goto = _safe_next(goto, root_of(request))
        if tenant is None:
            return render(request, "login.html", None, 401, next=goto,
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
    def jobs(request: Request):
        if (tenant := signed_in(request)) is None:
            return to_login(request)
        rows, more = queue.list_jobs(tenant, limit=100)
        return render(request, "jobs.html", tenant, jobs=rows, more=more, progress=progress_text)

    @router.get("/jobs/{job_id}")
    def job_page(request: Request, job_id: str):
        if (tenant := signed_in(request)) is None:
            return to_login(request)
        try:
            job = queue.get_job(tenant, job_id)
            events, _ = queue.events(tenant, job_id, newer_than=0)
            checkpoints, _ = queue.checkpoints(tenant, job_id, limit=100)
        except ServiceError:
            return not_found(request, tenant, f"Fine-tuning job {job_id}")
        files = []
        for role, file_id in [("training", job.training_file), ("validation", job.validation_file),
                              *(("results", f) for f in job.result_files or [])]:
            if file_id:
                try:
                    files.append((role, file_id, queue.get_file(tenant, file_id)))
                except ServiceError:
                    files.append((role, file_id, None))  # deleted since
        rows, series = [event_row(e) for e in reversed(events)], loss_series(events)
        latest = {name: number(points[-1][1], 4) if points else MISSING for name, points in series.items()}
        return render(request, "job.html", tenant, job=job, live=live_state(job), files=files, latest=latest,
                      checkpoints=checkpoints, events=rows[:LOG_ROWS], hidden_events=max(0, len(rows) - LOG_ROWS),
                      series=series, after=events[-1].seq if events else 0, poll_ms=POLL_MS,
                      adapter_id=job.registry_ref.split("@")[0] if job.registry_ref else None)

    @router.get("/jobs/{job_id}/metrics.json")
    def job_metrics(request: Request, job_id: str, after: int = Query(0, ge=0)):
        if (tenant := signed_in(request)) is None:
            return JSONResponse({"error": "not signed in"}, 401, headers=HEADERS)
        try:
            job = queue.get_job(tenant, job_id)
            events, _ = queue.events(tenant, job_id, newer_than=after)
        except ServiceError:
            return JSONResponse({"error": "no such job"}, 404, headers=HEADERS)
        return JSONResponse({**live_state(job), "events": [event_row(e) for e in events],
                             "after": events[-1].seq if events else after}, headers=HEADERS)

    @router.post("/jobs/{job_id}/cancel")
    def cancel(request: Request, job_id: str):
        if (tenant := signed_in(request)) is None:
            return to_login(request)
        try:
            queue.cancel(tenant, job_id)
        except ServiceError as e:
            if e.status == 404:
                return not_found(request, tenant, f"Fine-tuning job {job_id}")
            # it ended meanwhile: its page says how
        return RedirectResponse(f"{root_of(request)}/jobs/{quote(job_id)}", 303, headers=HEADERS)

    @router.get("/adapters")
    def adapters(request: Request):
        if (tenant := signed_in(request)) is None:
            return to_login(request)
        rows = registry.search(include_private=visible(tenant))
        rows.sort(key=lambda v: (not v.private, v.id))
        return render(request, "adapters.html", tenant, adapters=rows)

    def version_of(tenant: str, namespace: str, name: str, version: str | None):
        info = registry.show(f"{namespace}/{name}", include_private=visible(tenant))
        if version:
            chosen = next((v for v in info.versions if v.version == version), None)
        else:
            chosen = info.latest or info.versions[-1]
        return info, chosen

    @router.get("/adapters/{namespace}/{name}")
    def adapter_page(request: Request, namespace: str, name: str, version: str | None = None):
        if (tenant := signed_in(request)) is None:
            return to_login(request)
        try:
            info, chosen = version_of(tenant, namespace, name, version)
        except RegistryError:
            chosen = None
        if chosen is None:
            return not_found(request, tenant, f"Adapter {namespace}/{name}" + (f"@{version}" if version else ""))
        card = next((f for f in chosen.files if f.path == "README.md"), None)
        card_html = None
        if card is not None:
            text = registry.store.path(card.sha256).read_text(encoding="utf-8", errors="replace")
            files_url = f"{root_of(request)}/adapters/{quote(info.id)}/files/{quote(chosen.version)}"
            card_html = render_card(text, files_url, {f.path for f in chosen.files})
        return render(request, "adapter.html", tenant, info=info, version=chosen, card_html=card_html,
                      metrics=sorted(chosen.metrics.items()))

    @router.get("/adapters/{namespace}/{name}/files/{version}/{path:path}")
    def adapter_file(request: Request, namespace: str, name: str, version: str, path: str):
        if (tenant := signed_in(request)) is None:
            return to_login(request)
        try:
            _, chosen = version_of(tenant, namespace, name, version)
        except RegistryError:
            chosen = None
        entry = next((f for f in chosen.files if f.path == path), None) if chosen else None
        if entry is None:
            return not_found(request, tenant, f"File {path} of {namespace}/{name}@{version}")
        suffix = Path(path).suffix.lower()
        inline = INLINE_TYPES.get(suffix)
        return FileResponse(registry.store.path(entry.sha256), media_type=inline or "application/octet-stream",
                            filename=None if inline else Path(path).name,
                            headers={**HEADERS, "Cache-Control": "private, max-age=3600"})

    @router.get("/leaderboard")
    def leaderboard_page(request: Request, sort: str = "hallucination_rate", order: str | None = None):
        if (tenant := signed_in(request)) is None:
            return to_login(request)
        board = leaderboard(registry.search(include_private=visible(tenant)), sort, order or "")
        return render(request, "leaderboard.html", tenant, **board)

    @router.get("/static/{name}")
    def static(name: str):
        path = static_files.get(name)
        if path is None:
            return Response("not found", 404, media_type="text/plain", headers=HEADERS)
        return FileResponse(path, media_type=STATIC_TYPES[path.suffix],
                            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=300"})

    return router
