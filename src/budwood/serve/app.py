"""`create_app`: the OpenAI-compatible HTTP server over one AsyncEngine.

Routes: /v1/models, /v1/chat/completions, /v1/completions (streaming over SSE, seed, logprobs, echo,
n, stop, response_format), /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's names),
/health and /metrics (Prometheus). Errors use OpenAI's shape {"error": {message, type, param, code}}.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from budwood.engine import AsyncEngine, Engine, EngineConfig, ParamError, QueueFull, SamplingParams, UnknownAdapter
from budwood.engine.adapters import AdapterError
from budwood.engine.engine import RequestOutput, merge_outputs
from budwood.engine.sampling import TokenLogprob
from budwood.errors import BudwoodError, did_you_mean
from budwood.serve.auth import (
    Authenticator,
    AuthMiddleware,
    Caller,
    ModelAccess,
    NoKey,
    RegistryAccess,
    SingleKey,
    caller_of,
)
from budwood.serve.metrics import Metrics
from budwood.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    error_body,
    new_id,
    now,
    usage,
)

log = logging.getLogger(__name__)
# how pydantic names the member of a union in an error's location: literal['auto'], constrained-int, int
_UNION_MEMBER = re.compile(r"^([a-z_-]+\[.*\]|constrained-[a-z]+|function-[a-z-]+|int|float|str|bool|dict|list|none)$")


def create_app(config: EngineConfig | None = None, api_key: str | None = None, engine: Engine | None = None,
               registry=None, pull_dir: Path | None = None, auth: Authenticator | None = None,
               access: ModelAccess | None = None, resolvers: list | None = None, routers: list | None = None,
               title: str = "budwood", metrics_token: str | None = None, accept_private_terms: bool = False
               ) -> FastAPI:
    """The server app; pass `engine` to share an already loaded one (tests, the service).

    `registry` (budwood.registry.open_registry): its ids `org/name@version` are served as model names,
    pulled on first use (into `pull_dir`, default BUDWOOD_HOME/adapters); private ones only to callers
    who may see them (with `api_key`, its holder). A local registry is also offered at /v1/registry.
    The fine-tuning service passes its own `auth` (tenant keys), `access` (tenants' `ft:` models),
    `resolvers` and `routers` (files, fine-tuning jobs, dashboard), a `metrics_token` that /metrics then
    asks for (its labels name the models callers used; "" turns /metrics off), and
    `accept_private_terms`: a private registry adapter's terms are its owner's, accepted when the owner
    uses it. Tenants' prompts are cached
    apart (a cache salt per tenant), so no timing tells one tenant what another asked."""
    state: dict = {}
    resolvers = list(resolvers or [])
    if registry is not None:
        from budwood.registry.resolver import RegistryResolver

        resolvers.append(RegistryResolver(registry, pull_dir, include_private=True,  # access decides who sees
                                          accept_private_terms=accept_private_terms))
    auth = auth or (SingleKey(api_key) if api_key else NoKey())
    access = access or RegistryAccess(registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        eng = engine or await asyncio.to_thread(Engine, config or EngineConfig(), resolvers)
        if engine is not None:
            engine.adapters.resolvers.extend(resolvers)
        state["engine"] = eng
        state["async"] = AsyncEngine(eng)
        state["metrics"] = Metrics(state["async"])
        state["async"].on_step = state["metrics"].observe_step
        state["grammar"] = None
        yield
        state["async"].shutdown()

    app = FastAPI(title=title, lifespan=lifespan)
    app.add_middleware(AuthMiddleware, authenticator=auth)
    if registry is not None:
        from budwood.registry.local import LocalRegistry
        from budwood.serve.registry_routes import registry_router

        if isinstance(registry, LocalRegistry):
            app.include_router(registry_router(registry))
    for router in routers or []:
        app.include_router(router)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()  # for a union field, one per member: the one that is not "should be 'auto'"
        err = next((x for x in errors if x.get("type") != "literal_error"), errors[0])
        loc = [str(x) for x in err.get("loc", []) if x != "body" and not _UNION_MEMBER.match(str(x))]
        param = ".".join(loc) or None
        if err.get("type") == "json_invalid":
            msg = "The request body is not valid JSON."
        else:
            msg = f"{param or 'body'}: {err.get('msg')}" + (f" (got {err['input']!r})" if "input" in err and
                                                              not isinstance(err["input"], dict) else "")
        return JSONResponse(error_body(msg, param=param, code="invalid_value" if param else None), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return JSONResponse(error_body(f"internal server error: {type(e).__name__}", "server_error"), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    # -- helpers ----------------------------------------------------------------------------------
    def eng() -> Engine:
        return state["engine"]

    def operator_only(request: Request) -> None:
        if caller_of(request).tenant is not None:
            raise APIError(403, "only the server's operator may load or unload adapters", "permission_error")

    def usable_names(caller: Caller) -> list[str]:
        e = eng()
        return [e.base_name, *(n for n in e.adapters.names() if access.can_use(caller, n)), *access.listed(caller)]

    async def not_found(caller: Caller, model: str) -> APIError:
        """The same answer for a model that does not exist and one the caller may not see; suggestions
        only from what the caller may use."""
        hint = did_you_mean(model, await asyncio.to_thread(usable_names, caller))
        return APIError(404, f"The model `{model}` does not exist.{hint}", param="model", code="model_not_found")

    async def resolve(caller: Caller, model: str):
        if not await asyncio.to_thread(access.can_use, caller, model):  # before the engine's cache is asked
            raise await not_found(caller, model)
        try:
            return await asyncio.to_thread(eng().adapter, model)
        except UnknownAdapter:
            raise await not_found(caller, model) from None
        except AdapterError as e:
            raise APIError(400, str(e), param="model", code="invalid_adapter") from None

    async def grammar(response_format: dict | None):
        if not response_format or response_format.get("type") == "text":
            return None
        from budwood.engine.grammar import GrammarCompiler, GrammarError
        if state["grammar"] is None:
            e = eng()
            state["grammar"] = GrammarCompiler(e.tokenizer, e.runner.vocab_size, e.stop_ids)
        try:
            return await asyncio.to_thread(state["grammar"].compile, response_format)
        except GrammarError as e:
            raise APIError(400, str(e), param="response_format") from None

    def sampling(req, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
                 grammar_, cache_salt: str | None) -> SamplingParams:
        if getattr(req, "tools", None):
            raise APIError(400, "tools/function calling is not supported by budwood serve", param="tools")
        if getattr(req, "suffix", None):
            raise APIError(400, "suffix is not supported", param="suffix")
        if getattr(req, "best_of", None) not in (None, req.n):
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            bias = {int(k): float(v) for k, v in (req.logit_bias or {}).items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from None
        try:
            return SamplingParams(max_tokens=max_tokens,
                                  temperature=1.0 if req.temperature is None else req.temperature,
                                  top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k, min_p=req.min_p,
                                  presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                  repetition_penalty=req.repetition_penalty, logit_bias=bias, stop=stop,
                                  stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, n=req.n,
                                  seed=req.seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs, grammar=grammar_,
                                  cache_salt=cache_salt)
        except ParamError as e:
            raise APIError(400, str(e), param=e.param) from None

    async def run(request: Request, prompt_ids: list[int], params: SamplingParams, adapter, logprobs_from: int = 1
                  ) -> AsyncIterator[RequestOutput]:
        try:
            stream = state["async"].submit(prompt_ids, params, adapter, logprobs_from)
            async for out in stream:
                yield out
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_exceeded", None, "rate_limit_exceeded") from None
        except ParamError as e:
            raise APIError(400, str(e), param=e.param) from None
        except BudwoodError as e:
            raise APIError(500, str(e), "server_error") from None

    async def collect(request: Request, gen: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
        """Drain a generation, aborting it if the client goes away."""
        outs: list[RequestOutput] = []

        async def drain():
            async for o in gen:
                outs.append(o)

        task = asyncio.create_task(drain())
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await gen.aclose()
                raise APIError(499, "client disconnected")
        task.result()
        return outs

    def token_text(tid: int) -> str:
        return eng().tokenizer.decode([tid])

    def chat_logprobs(lps: list[TokenLogprob]) -> list[dict]:
        return [{"token": (t := token_text(lp.token_id)), "logprob": lp.logprob, "bytes": list(t.encode()),
                 "top_logprobs": [{"token": (tt := token_text(i)), "logprob": v, "bytes": list(tt.encode())}
                                  for i, v in lp.top]} for lp in lps]

    def sse(obj) -> str:
        return json.dumps(obj, separators=(",", ":"))

    async def stream_response(chunks: AsyncIterator[dict]):
        """SSE ending with [DONE]; the first chunk is awaited first, so a request that fails at once
        (queue full, prompt too long) gets a plain error response with its HTTP status."""
        from sse_starlette.sse import EventSourceResponse

        first = await anext(chunks, None)

        async def events():
            try:
                if first is not None:
                    yield {"data": sse(first)}
                async for chunk in chunks:
                    yield {"data": sse(chunk)}
            except APIError as e:
                yield {"data": sse(e.body)}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events(), ping=15, sep="\n")

    # -- routes -----------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": eng().base_name, "in_flight": state["async"].in_flight}

    @app.get("/metrics")
    async def metrics(request: Request):
        if metrics_token == "":
            raise APIError(403, "/metrics is off on this server: give it a metrics token to turn it on",
                           "permission_error")
        if metrics_token is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {metrics_token}".encode()):
                raise APIError(401, "/metrics needs the server's metrics token (Authorization: Bearer TOKEN)",
                               code="invalid_api_key")
        body, ctype = state["metrics"].render()
        return Response(body, media_type=ctype)

    def model_cards(caller: Caller) -> list[dict]:
        e = eng()
        cards = [{"id": e.base_name, "object": "model", "created": 0, "owned_by": "budwood", "root": e.base_name,
                  "parent": None, "max_model_len": e.runner.max_model_len}]
        names = [n for n in e.adapters.names() if access.can_use(caller, n)]
        for name in sorted(set(names) | set(access.listed(caller))):
            cards.append({"id": name, "object": "model", "created": 0, "owned_by": caller.tenant or "budwood",
                          "root": name, "parent": e.base_name, "max_model_len": e.runner.max_model_len})
        return cards

    @app.get("/v1/models")
    async def list_models(request: Request):
        return {"object": "list", "data": await asyncio.to_thread(model_cards, caller_of(request))}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request):
        for card in await asyncio.to_thread(model_cards, caller_of(request)):
            if card["id"] == model:
                return card
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadAdapterRequest, request: Request):
        operator_only(request)
        e = eng()
        if not e.config.adapters:
            raise APIError(400, "runtime adapter loading needs the server started with --adapters DIR; "
                                "adapter paths must lie inside it", param="lora_path")
        root = Path(e.config.adapters).expanduser().resolve()
        path = (root / body.lora_path).resolve()
        if root != path and root not in path.parents:
            raise APIError(400, f"lora_path {body.lora_path!r} is outside the adapters folder {root}",
                           param="lora_path")
        if body.lora_name == e.base_name:
            raise APIError(400, f"{body.lora_name!r} is the base model's name", param="lora_name")
        from budwood.engine.adapters import ADAPTER_NAME
        if not ADAPTER_NAME.match(body.lora_name) or body.lora_name.startswith("ft:"):
            raise APIError(400, f"lora_name {body.lora_name!r}: use letters, digits and . _ - : @ / (names starting "
                                "'ft:' are the fine-tuning service's)", param="lora_name")
        try:
            await asyncio.to_thread(e.register_adapter, body.lora_name, path)
        except AdapterError as err:
            raise APIError(400, str(err), param="lora_path", code="invalid_adapter") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadAdapterRequest, request: Request):
        operator_only(request)
        try:
            eng().unregister_adapter(body.lora_name)
        except AdapterError as err:
            raise APIError(404, str(err), param="lora_name", code="model_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        t0 = time.perf_counter()
        adapter = await resolve(caller_of(request), body.model)
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                if any(p.get("type") != "text" for p in content):
                    raise APIError(400, f"messages.{i}.content: only text parts are supported",
                                   param=f"messages.{i}.content")
                content = "".join(str(p.get("text", "")) for p in content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        try:
            prompt_ids = eng().chat_prompt(messages, adapter, body.add_generation_prompt)
        except Exception as e:  # a template that rejects the conversation (jinja raise_exception)
            raise APIError(400, f"messages: the chat template rejected them: {e}", param="messages") from None
        top = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        params = sampling(body, body.max_completion_tokens or body.max_tokens, top, None,
                          await grammar(body.response_format), caller_of(request).tenant)
        rid, created, fp = new_id("chatcmpl"), now(), eng().system_fingerprint
        base = {"id": rid, "created": created, "model": body.model, "system_fingerprint": fp}
        gen = run(request, prompt_ids, params, adapter)
        metrics = state["metrics"]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def chunks():
                started, status = set(), "ok"
                first_token = None
                try:
                    async for out in gen:
                        for c in out.choices:
                            delta = {}
                            if c.index not in started:
                                started.add(c.index)
                                delta["role"] = "assistant"
                            if c.text or "role" in delta:
                                delta["content"] = c.text
                            if first_token is None and c.text:
                                first_token = time.perf_counter() - t0
                                metrics.first_token.observe(first_token)
                            choice = {"index": c.index, "delta": delta,
                                      "logprobs": {"content": chat_logprobs(c.logprobs)} if body.logprobs else None,
                                      "finish_reason": c.finish_reason}
                            yield {**base, "object": "chat.completion.chunk", "choices": [choice],
                                   **({"usage": None} if include_usage else {})}
                        if out.finished:
                            metrics.tokens(body.model, out.prompt_tokens, out.completion_tokens)
                            if include_usage:
                                yield {**base, "object": "chat.completion.chunk", "choices": [],
                                       "usage": usage(out.prompt_tokens, out.completion_tokens)}
                except APIError:
                    status = "error"
                    raise
                finally:
                    metrics.request(body.model, "chat", status, time.perf_counter() - t0)
            return await stream_response(chunks())
        try:
            outs = await collect(request, gen)
        except APIError:
            metrics.request(body.model, "chat", "error", time.perf_counter() - t0)
            raise
        final = None
        for o in outs:
            final = merge_outputs(final, o)
        metrics.request(body.model, "chat", "ok", time.perf_counter() - t0)
        metrics.tokens(body.model, final.prompt_tokens, final.completion_tokens)
        return {**base, "object": "chat.completion",
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": {"content": chat_logprobs(c.logprobs)} if body.logprobs else None,
                             "finish_reason": c.finish_reason} for c in final.choices],
                "usage": usage(final.prompt_tokens, final.completion_tokens)}

    def completion_logprobs(lps: list[TokenLogprob | None], token_ids: list[int], offset0: int) -> dict:
        tokens, token_lps, tops, offsets, at = [], [], [], [], offset0
        for tid, lp in zip(token_ids, lps):
            t = token_text(tid)
            tokens.append(t)
            offsets.append(at)
            at += len(t)
            token_lps.append(None if lp is None else lp.logprob)
            tops.append(None if lp is None else {token_text(i): v for i, v in lp.top})
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        t0 = time.perf_counter()
        adapter = await resolve(caller_of(request), body.model)
        p = body.prompt
        if isinstance(p, str):  # text prompts get the tokenizer's BOS, as HF and vLLM give them
            prompts = [eng().encode(p, add_special_tokens=True)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [eng().encode(x, add_special_tokens=True) for x in p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]
        else:
            raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of "
                                "lists of token ids, and not empty", param="prompt")
        if any(not x for x in prompts):
            raise APIError(400, "a prompt is empty", param="prompt")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens=0 only makes sense with echo=true", param="max_tokens")
        if body.stream and body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported when streaming", param="echo")
        params = sampling(body, body.max_tokens, body.logprobs,
                          body.logprobs if body.echo and body.logprobs is not None else None,
                          await grammar(body.response_format), caller_of(request).tenant)
        rid, created, fp = new_id("cmpl"), now(), eng().system_fingerprint
        base = {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "system_fingerprint": fp}
        metrics = state["metrics"]
        n = body.n
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def chunks():
                status, totals = "ok", [0, 0]
                try:
                    for pi, ids in enumerate(prompts):
                        if body.echo:
                            for i in range(n):
                                yield {**base, "choices": [{"index": pi * n + i, "text": eng().tokenizer.decode(ids),
                                                            "logprobs": None, "finish_reason": None}],
                                       **({"usage": None} if include_usage else {})}
                        async for out in run(request, ids, params, adapter):
                            for c in out.choices:
                                lp = (completion_logprobs(c.logprobs, c.token_ids, 0)
                                      if body.logprobs is not None else None)
                                yield {**base, "choices": [{"index": pi * n + c.index, "text": c.text, "logprobs": lp,
                                                            "finish_reason": c.finish_reason}],
                                       **({"usage": None} if include_usage else {})}
                            if out.finished:
                                totals[0] += out.prompt_tokens
                                totals[1] += out.completion_tokens
                    metrics.tokens(body.model, *totals)
                    if include_usage:
                        yield {**base, "choices": [], "usage": usage(*totals)}
                except APIError:
                    status = "error"
                    raise
                finally:
                    metrics.request(body.model, "completions", status, time.perf_counter() - t0)
            return await stream_response(chunks())

        async def one(ids):
            final = None
            for o in await collect(request, run(request, ids, params, adapter)):
                final = merge_outputs(final, o)
            return final
        try:
            async with asyncio.TaskGroup() as group:  # one prompt failing cancels (aborts) the others
                tasks = [group.create_task(one(ids)) for ids in prompts]
            finals = [t.result() for t in tasks]
        except* APIError as errors:
            metrics.request(body.model, "completions", "error", time.perf_counter() - t0)
            raise errors.exceptions[0] from None
        choices = []
        for pi, (ids, final) in enumerate(zip(prompts, finals)):
            prompt_text = eng().tokenizer.decode(ids) if body.echo else ""
            for c in final.choices:
                lp = None
                if body.logprobs is not None:
                    gen_lp = completion_logprobs(c.logprobs, c.token_ids, len(prompt_text))
                    if body.echo:
                        plp = completion_logprobs(final.prompt_logprobs or [None] * len(ids), ids, 0)
                        lp = {k: plp[k] + gen_lp[k] for k in plp}
                    else:
                        lp = gen_lp
                choices.append({"index": pi * n + c.index, "text": prompt_text + c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        pt, ct = sum(f.prompt_tokens for f in finals), sum(f.completion_tokens for f in finals)
        metrics.request(body.model, "completions", "ok", time.perf_counter() - t0)
        metrics.tokens(body.model, pt, ct)
        return {**base, "choices": choices, "usage": usage(pt, ct)}

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
          registry=None) -> None:
    import uvicorn

    uvicorn.run(create_app(config, api_key, registry=registry), host=host, port=port, log_level="info")

