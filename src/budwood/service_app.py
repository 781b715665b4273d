"""The fine-tuning service's server: one app with every surface, and the process that runs it.

Why a module of its own, above jobs/ and web/: the app is the serving routes (budwood.serve), the
fine-tuning API (budwood.jobs.routes) and the dashboard (budwood.web), and the dashboard shows the
jobs, so web/ depends on jobs/. Assembling them inside jobs/ would make jobs/ import web/ back;
here, each package depends only on the ones below it, and this module on all three.

    create_service_app(service)  the routers, the serving objects on `app.state`, the tenants' auth
    run_service(config)          that app under uvicorn, with config.workers worker processes beside it, supervised
"""
from __future__ import annotations

from fastapi import FastAPI

from budwood.jobs.service import Service, ServiceConfig


def create_service_app(service: Service, engine=None, supervisor=None) -> FastAPI:
    """The server app with every route: inference (the base, registry ids, tenants' ft: models),
    /v1/registry, /v1/files, /v1/fine_tuning and the dashboard, every one scoped to the caller's tenant.
    `engine`: an already loaded inference engine to share (tests); default, one made from config.serving.
    `supervisor`: the WorkerSupervisor of this process's workers, which /health reports."""
    from budwood.errors import require_extra

    require_extra("service", "the fine-tuning service (file uploads, the dashboard)", "python_multipart",
                  "markdown_it")
    from budwood.jobs.resolver import FineTunedResolver, ServiceAccess
    from budwood.jobs.routes import files, fine_tuning, health, uploads
    from budwood.jobs.serving_files import ServingFiles, ServingUploads
    from budwood.jobs.serving_jobs import ServingFineTuning
    from budwood.jobs.tenants import TenantAuth
    from budwood.serve.app import create_app
    from budwood.web import dashboard
    from budwood.web.serving import Dashboard

    config = service.config
    pull_dir = config.home.expanduser() / "served"
    app = create_app(config.serving, engine=engine, registry=service.registry, pull_dir=pull_dir,
                     auth=TenantAuth(service.tenants, config.key_cache_s),
                     access=ServiceAccess(service.queue, service.registry),
                     resolvers=[FineTunedResolver(service.queue, service.storage, service.registry, pull_dir)],
                     routers=[health.router, files.router, uploads.router, fine_tuning.router,
                              fine_tuning.checkpoints_router, fine_tuning.models_router, dashboard.router],
                     title="budwood service", metrics_token=config.metrics_token or "", accept_private_terms=True,
                     limits=config.limits)
    app.state.serving_files = ServingFiles(service)
    app.state.serving_uploads = ServingUploads(service)
    app.state.serving_jobs = ServingFineTuning(service)
    app.state.dashboard = Dashboard(service)
    app.state.supervisor = supervisor
    return app


def run_service(config: ServiceConfig) -> None:
    """Serve on config.host:config.port, with config.workers worker processes beside the server, each
    started again if it dies (WorkerSupervisor)."""
    import uvicorn

    from budwood.jobs.worker import WorkerSupervisor

    service = Service(config)
    service.ensure_key()
    supervisor = WorkerSupervisor(config, service.queue).start()
    try:
        uvicorn.run(create_service_app(service, supervisor=supervisor), host=config.host, port=config.port,
                    log_level="info")
    finally:  # (uvicorn re-raises SIGTERM after its shutdown, so then the workers see this process gone)
        supervisor.stop()
        service.close()
