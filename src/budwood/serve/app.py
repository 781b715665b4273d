"""`create_app`: the OpenAI-compatible HTTP server over one AsyncEngine.

Routes (serve/routes/, one router per family): /v1/models, /v1/chat/completions, /v1/completions
(streaming over SSE, seed, logprobs, echo, n, stop, response_format), /v1/load_lora_adapter and
/v1/unload_lora_adapter (vLLM's names), /health and /metrics (Prometheus), and /v1/registry over a
local registry. The lifespan builds the serving object (`app.state.openai_serving`); errors use
OpenAI's shape {"error": {message, type, param, code}}, mapped in serve/errors.py.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from fastapi import FastAPI

from budwood.engine import Engine, EngineConfig
from budwood.errors import BudwoodError
from budwood.serve.auth import Authenticator, AuthMiddleware, ModelAccess, NoKey, RegistryAccess, SingleKey
from budwood.serve.errors import install_error_handlers
from budwood.serve.limits import ServeLimits
from budwood.serve.routes import OPENAI_ROUTERS
from budwood.serve.serving import OpenAIServing, ServeOptions


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Build the OpenAI surface's serving object from `app.state.serve_options`; stop its engine loop after."""
    serving = await OpenAIServing.start(app.state.serve_options)
    app.state.openai_serving = serving
    try:
        yield
    finally:
        serving.shutdown()


def create_app(config: EngineConfig | None = None, api_key: str | None = None, engine: Engine | None = None,
               registry=None, pull_dir: Path | None = None, auth: Authenticator | None = None,
               access: ModelAccess | None = None, resolvers: list | None = None, routers: list | None = None,
               title: str = "budwood", metrics_token: str | None = None, accept_private_terms: bool = False,
               limits: ServeLimits | None = None) -> FastAPI:
    """The server app; pass `engine` to share an already loaded one (tests, the service).

    `registry` (budwood.registry.open_registry): its ids `org/name@version` are served as model names,
    pulled on first use (into `pull_dir`, default BUDWOOD_HOME/adapters); private ones only to callers
    who may see them (with `api_key`, its holder). A local registry is also offered at /v1/registry.
    The fine-tuning service passes its own `auth` (tenant keys), `access` (tenants' `ft:` models),
    `resolvers` and `routers` (files, fine-tuning jobs, dashboard), a `metrics_token` that /metrics then
    asks for (its labels name the models callers used; "" turns /metrics off), and
    `accept_private_terms`: a private registry adapter's terms are its owner's, accepted when the owner
    uses it. Tenants' prompts are cached apart (a cache salt per tenant), so no timing tells one tenant
    what another asked. Every route of the app, `routers` included, answers errors through serve/errors.py.
    `limits` bounds each inference request (serve/limits.py; default ServeLimits())."""
    resolvers = list(resolvers or [])
    if registry is not None:
        from budwood.registry.resolver import RegistryResolver

        resolvers.append(RegistryResolver(registry, pull_dir, include_private=True,  # access decides who sees
                                          accept_private_terms=accept_private_terms))
    app = FastAPI(title=title, lifespan=lifespan)
    app.state.serve_limits = limits = limits or ServeLimits()
    app.state.serve_options = ServeOptions(config, engine, resolvers, access or RegistryAccess(registry),
                                           metrics_token, limits)
    app.add_middleware(AuthMiddleware, authenticator=auth or (SingleKey(api_key) if api_key else NoKey()),
                       prefixes=("/v1/", "/tokenize", "/detokenize"))
    install_error_handlers(app)
    if registry is not None:
        from budwood.registry.local import LocalRegistry

        if isinstance(registry, LocalRegistry):
            from budwood.serve.routes import registry as registry_routes

            app.state.registry = registry
            app.include_router(registry_routes.router)
    for router in [*(routers or []), *OPENAI_ROUTERS]:
        app.include_router(router)
    return app


@contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` in a background thread (port 0: a free one) while the block runs; yields its base URL.
    For the demo and tests: one process that serves and calls itself."""
    import socket
    import threading

    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise BudwoodError(f"the server could not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def serve(config: EngineConfig, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          registry=None, limits: ServeLimits | None = None) -> None:
    import uvicorn

    uvicorn.run(create_app(config, api_key, registry=registry, limits=limits), host=host, port=port,
                log_level="info")
