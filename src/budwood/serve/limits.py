"""`ServeLimits`: every bound the inference routes hold one request to, in one place (docs/serving.md, Limits).

Why: one caller's request must not stall or exhaust a server that others share. Each limit is checked
as early and as cheaply as it can be: the body's size from Content-Length and again while it is read
(before any JSON parsing), its nesting depth by a linear scan before json.loads recurses, counts and
lengths on the parsed request before the adapter is loaded, the prompt's characters before it is
tokenised and its tokens after. A refusal is a 400 (413 for the body) naming the field and the
`--limit` that sets it.
"""
from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from budwood.data.formats import json_depth
from budwood.engine import TemplateBudget
from budwood.errors import BudwoodError, ConfigError, ErrorKind, did_you_mean

LIMIT_CODE = "limit_exceeded"


class ServeLimits(BaseModel):
    """Per-request bounds; `budwood serve --limit NAME=VALUE` sets any of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_body_bytes: int = Field(8 << 20, ge=1024, description="request body size (413 beyond)")
    max_json_depth: int = Field(64, ge=8, le=512, description="nesting of arrays and objects in a body")
    max_prompt_chars: int = Field(1_000_000, ge=1, description="characters of a prompt (all messages' text, or "
                                                               "each completion prompt), checked before tokenising")
    max_prompt_tokens: int | None = Field(None, ge=1, description="tokens of a prompt; null: the model's context "
                                                                  "length")
    max_prompts: int = Field(2048, ge=1, description="prompts in one /v1/completions request")
    max_messages: int = Field(2048, ge=1, description="messages in one chat request")
    max_stop: int = Field(16, ge=0, le=64, description="stop strings (OpenAI allows 4; vLLM has no bound, and "
                          "lm-evaluation-harness sends a task's until strings plus EOS)")
    max_stop_chars: int = Field(256, ge=1, description="characters of one stop string")
    max_stop_token_ids: int = Field(64, ge=0, description="entries of stop_token_ids")
    max_logit_bias: int = Field(300, ge=0, description="entries of logit_bias")
    max_n: int = Field(128, ge=1, le=128, description="choices per prompt (n; OpenAI allows 128)")
    max_best_of: int = Field(20, ge=1, le=128, description="best_of (OpenAI: 20; budwood serves best_of = n only)")
    max_logprobs: int = Field(20, ge=0, le=20, description="completions `logprobs` and chat `top_logprobs`")
    template_max_steps: int = Field(2_000_000, ge=1000, description="lines of chat-template code one rendering "
                                                                     "may execute")
    template_max_chars: int = Field(4_000_000, ge=1000, description="characters one rendering may produce")

    @property
    def template_budget(self) -> TemplateBudget:
        return TemplateBudget(self.template_max_steps, self.template_max_chars)

    @classmethod
    def from_options(cls, options: list[str]) -> ServeLimits:
        """From `--limit NAME=VALUE` options; an unknown name or a bad value is refused by name."""
        values: dict[str, str | None] = {}
        for option in options:
            name, sep, value = option.partition("=")
            name = name.strip().replace("-", "_")
            if not sep:
                raise ConfigError(f"--limit {option!r}: expected NAME=VALUE, e.g. max_body_bytes=16777216")
            if name not in cls.model_fields:
                raise ConfigError(f"--limit {name!r}: no such limit{did_you_mean(name, cls.model_fields)}; "
                                  f"the limits are {', '.join(cls.model_fields)}")
            values[name] = None if value.strip().lower() in ("none", "null") else value.strip()
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            err = e.errors()[0]
            raise ConfigError(f"--limit {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def over(param: str, message: str, limit: str) -> BudwoodError:
    """A 400 naming the request field and the limit (`--limit NAME=...`) that refused it."""
    return BudwoodError(f"{param}: {message} (this server's limit {limit}; see docs/serving.md, Limits)",
                        param=param, code=LIMIT_CODE)


def limits_of(app: FastAPI) -> ServeLimits:
    return getattr(app.state, "serve_limits", None) or ServeLimits()


def _too_large(limits: ServeLimits, size: int | None) -> BudwoodError:
    said = f"the request body has {size:,} bytes" if size is not None else "the request body is larger"
    return BudwoodError(f"{said}; this server accepts at most {limits.max_body_bytes:,} (limit max_body_bytes)",
                        code="request_too_large", kind=ErrorKind.TOO_LARGE)


async def read_limited_body(request: Request, limits: ServeLimits) -> bytes:
    """The body, read no further than `max_body_bytes` (a declared Content-Length over it is refused
    before a byte is read) and refused if it nests deeper than `max_json_depth`; FastAPI then parses
    the bytes kept on the request."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _too_large(limits, int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise _too_large(limits, None)
        chunks.append(chunk)
    body = b"".join(chunks)
    # a linear scan, but of up to max_body_bytes: a large body's is done off the event loop
    depth = json_depth(body) if len(body) < 1 << 16 else await asyncio.to_thread(json_depth, body)
    if depth > limits.max_json_depth:
        raise BudwoodError(f"the request body nests arrays and objects deeper than {limits.max_json_depth} levels "
                           "(limit max_json_depth)", param="body", code=LIMIT_CODE)
    request._body = body  # starlette's cache of the body: what request.body() and .json() return from now on
    return body


class LimitedRoute(APIRoute):
    """A route whose body is read under the app's ServeLimits before FastAPI parses it (the inference
    routes; another package's router opts in with APIRouter(route_class=LimitedRoute))."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def limited(request: Request) -> Response:
            await read_limited_body(request, limits_of(request.app))
            return await handler(request)

        return limited


def _stops(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def check_sampling(limits: ServeLimits, req) -> None:
    """The counts and lengths a chat or completion request asks for, before anything is loaded."""
    stops = _stops(req.stop)
    if len(stops) > limits.max_stop:
        raise over("stop", f"{len(stops)} stop strings; at most {limits.max_stop} are allowed", "max_stop")
    if any(len(s) > limits.max_stop_chars for s in stops):
        longest = max(len(s) for s in stops)
        raise over("stop", f"a stop string of {longest:,} characters; at most {limits.max_stop_chars} per string",
                   "max_stop_chars")
    if req.n > limits.max_n:
        raise over("n", f"n={req.n}; at most {limits.max_n}", "max_n")
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of > limits.max_best_of:
        raise over("best_of", f"best_of={best_of}; at most {limits.max_best_of}", "max_best_of")
    if len(req.stop_token_ids) > limits.max_stop_token_ids:
        raise over("stop_token_ids", f"{len(req.stop_token_ids)} entries; at most {limits.max_stop_token_ids}",
                   "max_stop_token_ids")
    if len(req.logit_bias or {}) > limits.max_logit_bias:
        raise over("logit_bias", f"{len(req.logit_bias)} entries; at most {limits.max_logit_bias}", "max_logit_bias")
    for param in ("logprobs", "top_logprobs"):
        value = getattr(req, param, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > limits.max_logprobs:
            raise over(param, f"{param}={value}; at most {limits.max_logprobs}", "max_logprobs")


def check_chat(limits: ServeLimits, req, messages: list[dict]) -> None:
    """A chat request's counts, and its text's length before the template and the tokenizer see it."""
    check_sampling(limits, req)
    if len(messages) > limits.max_messages:
        raise over("messages", f"{len(messages):,} messages; at most {limits.max_messages}", "max_messages")
    chars = sum(len(m["content"]) for m in messages)
    if chars > limits.max_prompt_chars:
        raise over("messages", f"{chars:,} characters of text; at most {limits.max_prompt_chars:,}",
                   "max_prompt_chars")


def check_completion(limits: ServeLimits, req) -> None:
    """A completion request's counts, and each text prompt's length before the tokenizer sees it."""
    check_sampling(limits, req)
    p = req.prompt
    prompts = [p] if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)) else list(p)
    if len(prompts) > limits.max_prompts:
        raise over("prompt", f"{len(prompts):,} prompts; at most {limits.max_prompts}", "max_prompts")
    for x in prompts:
        if isinstance(x, str) and len(x) > limits.max_prompt_chars:
            raise over("prompt", f"a prompt of {len(x):,} characters; at most {limits.max_prompt_chars:,}",
                       "max_prompt_chars")


def check_prompt_tokens(limits: ServeLimits, param: str, prompts: list[list[int]]) -> None:
    """Each tokenised prompt against `max_prompt_tokens` (the engine holds it to the context length too)."""
    if limits.max_prompt_tokens is None:
        return
    longest = max((len(ids) for ids in prompts), default=0)
    if longest > limits.max_prompt_tokens:
        raise over(param, f"a prompt of {longest:,} tokens; at most {limits.max_prompt_tokens:,}",
                   "max_prompt_tokens")
