"""/v1/chat/completions: messages through the chat template, then one generation with n choices.

Streamed, each chunk carries one choice's new text (its first one the assistant role); with
`stream_options.include_usage` a last chunk with no choices carries the usage. Under calibrated
abstention (request field `calibrated_abstention`) the answer is judged whole before it is sent, so a
stream gets each choice in one chunk, with its `calibrated_abstention` verdict. Request and message
fields budwood does not implement are refused by name before anything else (`refuse_unsupported`).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request

from budwood.engine import merge_outputs
from budwood.errors import BudwoodError
from budwood.serve.auth import Caller
from budwood.serve.limits import check_chat, check_prompt_tokens
from budwood.serve.protocol import (
    CHAT_ONLY,
    CHAT_REFUSED,
    AbstentionVerdict,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Usage,
    new_id,
    now,
)
from budwood.serve.sse import stream_response

if TYPE_CHECKING:
    from budwood.engine import RequestOutput
    from budwood.serve.serving import OpenAIServing


def _empty(value) -> bool:
    """A field that says nothing (null, or an empty list, object or string): nothing is lost by not using it."""
    return value is None or (isinstance(value, list | dict | str) and not value)


def _same(value, allowed) -> bool:
    return type(value) is type(allowed) and value == allowed  # so that 0 is not False


def refuse_unsupported(body: ChatCompletionRequest) -> None:
    """Refuse by name (400, `param` the field) every sent field budwood does not implement, so no request is
    changed without telling its caller: CHAT_REFUSED, CHAT_ONLY with another value, and any field the
    request model does not declare. A field sent empty (null, [], {}, "") counts as not sent."""
    for name, value in body.model_dump(exclude_unset=True).items():
        if value is None or (name not in CHAT_ONLY and _empty(value)):
            continue
        if name in CHAT_REFUSED:
            raise BudwoodError(f"{name}: not supported by budwood serve ({CHAT_REFUSED[name]})", param=name,
                               code="unsupported_parameter")
        if name in CHAT_ONLY:
            allowed, why = CHAT_ONLY[name]
            if not any(_same(value, a) for a in allowed):
                shown = " or ".join(repr(a) for a in allowed)
                raise BudwoodError(f"{name}: only {shown} is supported by budwood serve ({why}); got {value!r}",
                                   param=name, code="unsupported_value")
        elif name not in ChatCompletionRequest.model_fields:
            raise BudwoodError(f"{name}: not a chat completions field that budwood serve implements", param=name,
                               code="unsupported_parameter")


def _refuse_message_fields(i: int, m) -> None:
    """Tool calls, tool results and other message fields are refused by name until budwood renders them;
    dropping them would change the conversation without telling the caller."""
    if m.role in ("tool", "function"):
        raise BudwoodError(f"messages.{i}.role: {m.role!r} messages (tool results) are not supported by budwood serve "
                           "yet", param=f"messages.{i}.role", code="unsupported_value")
    for name, value in (m.model_extra or {}).items():
        if _empty(value):
            continue
        what = ("tool calls in the history are not supported by budwood serve yet" if name in ("tool_calls",
                "function_call") else "budwood's chat templates are given each message's role and content only")
        raise BudwoodError(f"messages.{i}.{name}: {what}", param=f"messages.{i}.{name}", code="unsupported_parameter")


def template_messages(body: ChatCompletionRequest) -> list[dict]:
    """The messages as the chat template takes them: text only, `developer` read as `system`; any other
    message field is refused by name."""
    messages = []
    for i, m in enumerate(body.messages):
        _refuse_message_fields(i, m)
        content = m.content
        if isinstance(content, list):
            if any(p.get("type") != "text" for p in content):
                raise BudwoodError(f"messages.{i}.content: only text parts are supported",
                                   param=f"messages.{i}.content")
            content = "".join(str(p.get("text", "")) for p in content)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return messages


async def create_chat_completion(serving: OpenAIServing, body: ChatCompletionRequest, caller: Caller,
                                 request: Request):
    started = time.perf_counter()
    refuse_unsupported(body)
    messages = template_messages(body)
    check_chat(serving.limits, body, messages)  # counts and lengths first, before anything is loaded
    adapter = await serving.resolve(caller, body.model)
    try:  # rendering and tokenising take a while for a long conversation: off the event loop
        prompt_ids = await asyncio.to_thread(serving.engine.chat_prompt, messages, adapter,
                                             body.add_generation_prompt, serving.limits.template_budget)
    except BudwoodError:
        raise
    except Exception as e:  # a template that rejects the conversation (jinja raise_exception)
        raise BudwoodError(f"messages: the chat template rejected them: {e}", param="messages") from None
    check_prompt_tokens(serving.limits, "messages", [prompt_ids])
    top = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise BudwoodError("top_logprobs needs logprobs=true", param="top_logprobs")
    policy = await serving.abstention_policy(adapter, body.calibrated_abstention)
    params = serving.sampling_params(body, body.max_completion_tokens or body.max_tokens,
                                     serving.internal_logprobs(top, policy), None,
                                     await serving.grammar(body.response_format), caller.tenant)
    head = {"id": f"chatcmpl-{body.request_id}" if body.request_id else new_id("chatcmpl"), "created": now(),
            "model": body.model,
            "system_fingerprint": serving.engine.system_fingerprint}
    verdicts: dict[int, AbstentionVerdict] = {}
    outputs = serving.generate_held(prompt_ids, params, adapter, policy, verdicts)
    if body.stream:
        return await stream_response(_chunks(serving, body, head, outputs, started, verdicts))
    with serving.metrics.track(body.model, "chat", started) as track:
        final = None
        for out in await serving.collect(request, outputs):
            final = merge_outputs(final, out)
        track.tokens(final.prompt_tokens, final.completion_tokens)
    choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                          logprobs={"content": serving.chat_logprobs(c.logprobs)} if body.logprobs else None,
                          finish_reason=c.finish_reason, calibrated_abstention=verdicts.get(c.index))
               for c in final.choices]
    return ChatCompletionResponse(**head, choices=choices, usage=Usage.of(final.prompt_tokens, final.completion_tokens))


async def _chunks(serving: OpenAIServing, body: ChatCompletionRequest, head: dict,
                  outputs: AsyncIterator[RequestOutput], started: float,
                  verdicts: dict[int, AbstentionVerdict]) -> AsyncIterator[dict]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk = {**head, "object": "chat.completion.chunk"}
    usage_slot = {"usage": None} if include_usage else {}
    begun: set[int] = set()
    with serving.metrics.track(body.model, "chat", started) as track:
        async for out in outputs:
            for c in out.choices:
                delta = {}
                if c.index not in begun:
                    begun.add(c.index)
                    delta["role"] = "assistant"
                if c.text or "role" in delta:
                    delta["content"] = c.text
                if c.text:
                    track.first_token()
                choice = {"index": c.index, "delta": delta,
                          "logprobs": {"content": serving.chat_logprobs(c.logprobs)} if body.logprobs else None,
                          "finish_reason": c.finish_reason}
                if c.index in verdicts:
                    choice["calibrated_abstention"] = verdicts[c.index].model_dump()
                yield {**chunk, "choices": [choice], **usage_slot}
            if out.finished:
                track.tokens(out.prompt_tokens, out.completion_tokens)
                if include_usage:
                    yield {**chunk, "choices": [],
                           "usage": Usage.of(out.prompt_tokens, out.completion_tokens).model_dump()}
