"""vLLM's /tokenize, /detokenize and /version, which clients use to count a prompt's tokens before sending it.

/tokenize takes a completion `prompt` (special tokens added, as vLLM's default) or chat `messages` (through the
model's or adapter's chat template, tools included, with the chat route's checks and limits) and answers
{count, max_model_len, tokens, token_strs}; /detokenize turns ids back into text. Both need the key where the
server has one, and scope `model` to the caller as the /v1 routes do; without `model` they use the base, as
vLLM's do (lm-evaluation-harness leaves it out).
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from budwood import __version__
from budwood.errors import BudwoodError
from budwood.serve.auth import CallerDep
from budwood.serve.chat import template_messages, tool_format_for
from budwood.serve.limits import LimitedRoute, check_chat, check_prompt_tokens, over
from budwood.serve.protocol import ChatCompletionRequest, ChatMessage
from budwood.serve.serving import ServingDep
from budwood.serve.tools import tool_request

router = APIRouter(route_class=LimitedRoute)  # bodies read under ServeLimits


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field budwood does not honour is refused by name
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # vLLM's defaults: true for a prompt, false for messages
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, serving: ServingDep, caller: CallerDep) -> dict:
    if (body.prompt is None) == (body.messages is None):
        raise BudwoodError("send either prompt or messages", param="prompt" if body.prompt is None else "messages")
    limits, engine = serving.limits, serving.engine
    model = body.model or engine.base_name
    if body.prompt is not None:
        if len(body.prompt) > limits.max_prompt_chars:
            raise over("prompt", f"{len(body.prompt):,} characters; at most {limits.max_prompt_chars:,}",
                       "max_prompt_chars")
        await serving.resolve(caller, model)
        ids = await asyncio.to_thread(engine.encode, body.prompt, body.add_special_tokens is not False)
    else:
        if body.add_special_tokens:
            raise BudwoodError("add_special_tokens: the chat template adds the special tokens; none are added "
                               "after it", param="add_special_tokens")
        chat = ChatCompletionRequest(model=model, messages=body.messages, tools=body.tools)
        tools = tool_request(chat)
        messages = template_messages(chat)
        check_chat(limits, chat, messages)
        adapter = await serving.resolve(caller, model)
        tool_format_for(serving, adapter, tools, messages)  # tools or a tool history the template cannot render
        ids = await asyncio.to_thread(engine.chat_prompt, messages, adapter, body.add_generation_prompt,
                                      limits.template_budget, tools.tools if tools else None)
    check_prompt_tokens(limits, "prompt" if body.prompt is not None else "messages", [ids])
    strs = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": engine.runner.max_model_len, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, serving: ServingDep, caller: CallerDep) -> dict:
    engine = serving.engine
    await serving.resolve(caller, body.model or engine.base_name)
    if len(body.tokens) > engine.runner.max_model_len:
        raise BudwoodError(f"tokens: {len(body.tokens):,} ids; at most the model's context, "
                           f"{engine.runner.max_model_len:,}", param="tokens")
    vocab = len(engine.tokenizer)
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise BudwoodError(f"tokens: {bad} is not a token id of this model (0 to {vocab - 1})", param="tokens")
    return {"prompt": await asyncio.to_thread(engine.tokenizer.decode, body.tokens)}


@router.get("/version")
async def version() -> dict:
    return {"version": __version__}
