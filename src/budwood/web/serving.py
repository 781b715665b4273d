"""The dashboard's serving object (held on `app.state.dashboard`): who is signed in, the templates,
and what each page needs from the queue and the registry.

The pages live outside /v1, where the bearer-key middleware does not look: the login form takes the
tenant's API key, and the browser keeps it in an HttpOnly, SameSite=Strict cookie (Secure over https)
that every request checks again with `Tenants.tenant_of`, so a revoked key signs the browser out at
once. SameSite=Strict keeps the cookie off cross-site requests, which is what guards the POST routes
(cancel, logout). Another tenant's job or adapter is answered 404, exactly as one that does not exist.
"""
from __future__ import annotations

import functools
from pathlib import Path
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from budwood.errors import BudwoodError, NotFoundError
from budwood.jobs.protocol import checkpoint_model, method_of
from budwood.jobs.service import Service
from budwood.jobs.states import TERMINAL
from budwood.registry.names import RegistryError
from budwood.web import views

HERE = Path(__file__).parent
STATIC = HERE / "static"
COOKIE = "budwood_dashboard"
POLL_MS = 2000
LOG_ROWS = 300  # newest events shown in the log; the chart always has every step
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
           "X-Frame-Options": "DENY",
           "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                      "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"}
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".md": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8"}


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=views.when, number=views.number, size=views.size)
    env.globals.update(MISSING=views.MISSING, TERMINAL=TERMINAL, checkpoint_model=checkpoint_model)
    return env


@functools.lru_cache(maxsize=512)
def _results(path: Path) -> tuple[str | None, dict[str, tuple[float, float]]]:
    """(the adapter fingerprint it measured, suite.metric -> interval) of a results blob; blobs are named by
    their sha256 and never change, so this is cached."""
    from budwood.eval.results import load_results

    results = load_results(path)
    return results.target.adapter_fingerprint, {f"{suite}.{name}": tuple(m.ci) for suite, r in results.suites.items()
                                                 for name, m in r.metrics.items() if m.ci}


def root_of(request: Request) -> str:
    return request.scope.get("root_path", "") + "/dashboard"


class Dashboard:
    def __init__(self, service: Service):
        self.queue, self.registry, self.tenants = service.queue, service.registry, service.tenants
        self.env = _environment()
        self.static_files = {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in STATIC_TYPES}

    # -- signing in ---------------------------------------------------------------------------------------
    def signed_in(self, request: Request) -> str | None:
        """The tenant whose live key the browser's cookie holds, else None."""
        key = request.cookies.get(COOKIE)
        return self.tenants.tenant_of(key) if key else None

    def to_login(self, request: Request) -> RedirectResponse:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{root_of(request)}/login?next={quote(here, safe='')}", 303, headers=HEADERS)

    # -- pages --------------------------------------------------------------------------------------------
    def render(self, request: Request, template: str, tenant: str | None, status: int = 200,
               **context) -> HTMLResponse:
        html = self.env.get_template(template).render(root=root_of(request), tenant=tenant, **context)
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    def not_found(self, request: Request, tenant: str, what: str) -> HTMLResponse:
        return self.render(request, "error.html", tenant, 404, title="Not found",
                           message=f"{what} does not exist, or it is not yours.")

    def job_page(self, tenant: str, job_id: str) -> dict:
        """Everything the job's page shows: the job, its files, checkpoints, event log and loss series.
        NotFoundError if the tenant has no such job."""
        job = self.queue.get_job(tenant, job_id)
        events, _ = self.queue.events_of(job, newer_than=0)
        checkpoints, _ = self.queue.checkpoints_of(job, limit=100)
        files = []
        for role, file_id in [("training", job.training_file), ("validation", job.validation_file),
                              *(("results", f) for f in job.result_files or [])]:
            if file_id:
                try:
                    files.append((role, file_id, self.queue.get_file(tenant, file_id)))
                except NotFoundError:
                    files.append((role, file_id, None))  # deleted since
        rows, series = [views.event_row(e) for e in reversed(events)], views.loss_series(events)
        latest = {name: views.number(points[-1][1], 4) if points else views.MISSING for name, points in series.items()}
        hyperparameters = {k: v for k, v in job.hyperparameters.items() if k != "method"}
        return {"job": job, "method": method_of(job), "hyperparameters": hyperparameters,
                "live": views.live_state(job), "files": files, "latest": latest,
                "checkpoints": checkpoints, "events": rows[:LOG_ROWS], "hidden_events": max(0, len(rows) - LOG_ROWS),
                "series": series, "after": events[-1].seq if events else 0, "poll_ms": POLL_MS,
                "adapter_id": job.registry_ref.split("@")[0] if job.registry_ref else None}

    def job_metrics(self, tenant: str, job_id: str, after: int) -> dict:
        """What a job's page polls for: its live state and the events after `after` (a sequence number)."""
        job = self.queue.get_job(tenant, job_id)
        events, _ = self.queue.events_of(job, newer_than=after)
        return {**views.live_state(job), "events": [views.event_row(e) for e in events],
                "after": events[-1].seq if events else after}

    def visible(self, tenant: str) -> frozenset[str]:
        """The private registry namespaces a tenant sees: its own."""
        return frozenset({tenant})

    def adapters(self, tenant: str) -> list:
        rows = self.registry.search(include_private=self.visible(tenant))
        rows.sort(key=lambda v: (not v.private, v.id))
        return rows

    def version_of(self, tenant: str, namespace: str, name: str, version: str | None):
        """(AdapterInfo, the version asked for, or the latest); the version is None if there is no such
        version, and both are when the tenant sees no such adapter."""
        try:
            info = self.registry.show(f"{namespace}/{name}", include_private=self.visible(tenant))
        except RegistryError:
            return None, None
        if version:
            return info, next((v for v in info.versions if v.version == version), None)
        return info, info.latest or info.versions[-1]

    def card_html(self, request: Request, info, version) -> str | None:
        """The version's model card as HTML, its own files linked to the file route; None without a card."""
        card = next((f for f in version.files if f.path == "README.md"), None)
        if card is None:
            return None
        text = self.registry.store.path(card.sha256).read_text(encoding="utf-8", errors="replace")
        files_url = f"{root_of(request)}/adapters/{quote(info.id)}/files/{quote(version.version)}"
        return views.render_card(text, files_url, {f.path for f in version.files})

    def leaderboard(self, tenant: str, sort: str, order: str) -> dict:
        versions = self.registry.search(include_private=self.visible(tenant))
        return views.leaderboard(versions, sort, order, {(v.id, v.version): self.intervals(v) for v in versions})

    def intervals(self, version) -> dict[str, tuple[float, float]]:
        """suite.metric -> 95% interval, from the version's own results files (those measured on its weights;
        the registry keeps only the values)."""
        out: dict[str, tuple[float, float]] = {}
        for f in version.files:
            if not (f.path.startswith("eval/") and f.path.endswith(".json")):
                continue
            try:
                target, suites = _results(self.registry.store.path(f.sha256))
            except BudwoodError:  # a blob the store no longer has: the values are shown without intervals
                continue
            if target == version.adapter_fingerprint:
                out.update(suites)
        return out
