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
from budwood.engine.tools import (
    CallStart,
    ContentDelta,
    StreamEvent,
    ToolCallStream,
    ToolFormat,
    parse_tool_calls,
)
from budwood.errors import BudwoodError
from budwood.serve import protocol
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
    FunctionCallOut,
    ToolCallOut,
    Usage,
    new_id,
    now,
)
from budwood.serve.sse import stream_response
from budwood.serve.tools import ToolRequest, check_history, history_message, tool_request

if TYPE_CHECKING:
    from budwood.engine import RequestOutput
    from budwood.serve.serving import OpenAIServing


def refuse_unsupported(body: ChatCompletionRequest) -> None:
    """Refuse by name (400, `param` the field) every sent field budwood does not implement, so no request is
    changed without telling its caller: CHAT_REFUSED, CHAT_ONLY with another value, and any field the
    request model does not declare. A field sent empty (null, [], {}, "") counts as not sent."""
    protocol.refuse_unsupported(body, CHAT_REFUSED, CHAT_ONLY, "chat completions")


def _refuse_message_fields(i: int, m) -> None:
    """Message fields the chat templates are not given are refused by name; dropping them would change the
    conversation without telling the caller."""
    if m.role == "function":
        raise BudwoodError(f"messages.{i}.role: 'function' messages are OpenAI's deprecated function calling; "
                           "send tool messages with tool_call_id", param=f"messages.{i}.role", code="unsupported_value")
    for name, value in (m.model_extra or {}).items():
        if protocol.is_empty(value):
            continue
        what = ("OpenAI's deprecated function calling; send tool_calls" if name == "function_call"
                else "budwood's chat templates are given each message's role, content, tool calls and tool call id")
        raise BudwoodError(f"messages.{i}.{name}: {what}", param=f"messages.{i}.{name}", code="unsupported_parameter")


def template_messages(body: ChatCompletionRequest) -> list[dict]:
    """The messages as the chat template takes them: text, tool calls and tool results, `developer` read as
    `system`; any other message field is refused by name."""
    messages = []
    for i, m in enumerate(body.messages):
        _refuse_message_fields(i, m)
        content = m.content
        if isinstance(content, list):
            if any(p.get("type") != "text" for p in content):
                raise BudwoodError(f"messages.{i}.content: only text parts are supported",
                                   param=f"messages.{i}.content")
            content = "".join(str(p.get("text", "")) for p in content)
        messages.append({**history_message(i, m), "content": content or ""})
    check_history(messages)
    return messages


def tool_format_for(serving: OpenAIServing, adapter, tools: ToolRequest | None, messages: list[dict]
                 ) -> ToolFormat | None:
    """The call format of the template in use; a request with tools, or a history with tool calls or results,
    for a template that cannot render them is refused (400 naming the field)."""
    history = next((f"messages.{i}" for i, m in enumerate(messages) if m.get("tool_calls") or m["role"] == "tool"),
                   None)
    if tools is None and history is None:
        return None
    fmt = serving.engine.tool_format(adapter)
    if fmt is None:
        whose = f"adapter {adapter.name!r}" if adapter is not None else f"model {serving.engine.base_name!r}"
        raise BudwoodError(f"the chat template of {whose} does not support tools", param="tools" if tools else history,
                           code="unsupported_value")
    return fmt


def _message(text: str, tools: ToolRequest | None, fmt: ToolFormat | None) -> tuple[AssistantMessage, bool]:
    if tools is None or not tools.parses:
        return AssistantMessage(content=text), False
    reply = parse_tool_calls(text, fmt)
    calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
             for c in reply.tool_calls]
    return AssistantMessage(content=reply.content, tool_calls=calls or None), bool(calls)


async def create_chat_completion(serving: OpenAIServing, body: ChatCompletionRequest, caller: Caller,
                                 request: Request):
    started = time.perf_counter()
    refuse_unsupported(body)
    tools = tool_request(body)
    messages = template_messages(body)
    check_chat(serving.limits, body, messages)  # counts and lengths first, before anything is loaded
    adapter = await serving.resolve(caller, body.model)
    fmt = tool_format_for(serving, adapter, tools, messages)
    try:  # rendering and tokenising take a while for a long conversation: off the event loop
        prompt_ids = await asyncio.to_thread(serving.engine.chat_prompt, messages, adapter,
                                             body.add_generation_prompt, serving.limits.template_budget,
                                             tools.tools if tools else None)
    except BudwoodError:
        raise
    except Exception as e:  # a template that rejects the conversation (jinja raise_exception)
        raise BudwoodError(f"messages: the chat template rejected them: {e}", param="messages") from None
    check_prompt_tokens(serving.limits, "messages", [prompt_ids])
    top = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise BudwoodError("top_logprobs needs logprobs=true", param="top_logprobs")
    policy = await serving.abstention_policy(adapter, body.calibrated_abstention)
    forced = tools.grammar(fmt) if tools else None
    grammar = await (serving.tool_grammar(forced) if forced else serving.grammar(body.response_format))
    params = serving.sampling_params(body, body.max_completion_tokens or body.max_tokens,
                                     serving.internal_logprobs(top, policy), None, grammar, caller.tenant)
    head = {"id": f"chatcmpl-{body.request_id}" if body.request_id else new_id("chatcmpl"), "created": now(),
            "model": body.model,
            "system_fingerprint": serving.engine.system_fingerprint}
    verdicts: dict[int, AbstentionVerdict] = {}
    outputs = serving.generate_held(prompt_ids, params, adapter, policy, verdicts)
    if body.stream:
        return await stream_response(_chunks(serving, body, head, outputs, started, verdicts, tools, fmt))
    with serving.metrics.track(body.model, "chat", started) as track:
        final = None
        for out in await serving.collect(request, outputs):
            final = merge_outputs(final, out)
        track.tokens(final.prompt_tokens, final.completion_tokens)
    choices = []
    for c in final.choices:
        message, called = _message(c.text, tools, fmt)
        choices.append(ChatChoice(index=c.index, message=message,
                                  logprobs={"content": serving.chat_logprobs(c.logprobs)} if body.logprobs else None,
                                  finish_reason=tools.finish_reason(c.finish_reason, called) if tools
                                  else c.finish_reason, calibrated_abstention=verdicts.get(c.index)))
    return ChatCompletionResponse(**head, choices=choices, usage=Usage.of(final.prompt_tokens, final.completion_tokens))


def _delta(event: StreamEvent) -> dict:
    """One stream event as OpenAI's delta fields."""
    if isinstance(event, ContentDelta):
        return {"content": event.text}
    if isinstance(event, CallStart):
        return {"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                "function": {"name": event.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}


async def _chunks(serving: OpenAIServing, body: ChatCompletionRequest, head: dict,
                  outputs: AsyncIterator[RequestOutput], started: float,
                  verdicts: dict[int, AbstentionVerdict], tools: ToolRequest | None,
                  fmt: ToolFormat | None) -> AsyncIterator[dict]:
    """Each output's new text as chunks: with tools, through a ToolCallStream per choice, whose events become
    content or tool_calls deltas; the chunk that ends a choice carries its finish_reason."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk = {**head, "object": "chat.completion.chunk"}
    usage_slot = {"usage": None} if include_usage else {}
    begun: set[int] = set()
    parsers: dict[int, ToolCallStream] = {}
    with serving.metrics.track(body.model, "chat", started) as track:
        async for out in outputs:
            for c in out.choices:
                if tools is not None and tools.parses:
                    parser = parsers.setdefault(c.index, ToolCallStream(fmt))
                    events = parser.feed(c.text) + (parser.finish() if c.finish_reason else [])
                    deltas = [_delta(e) for e in events]
                    finish = tools.finish_reason(c.finish_reason, parser.called)
                else:
                    deltas, finish = ([{"content": c.text}] if c.text else []), c.finish_reason
                if c.text:
                    track.first_token()
                logprobs = {"content": serving.chat_logprobs(c.logprobs)} if body.logprobs else None
                if c.index not in begun:  # a choice's first chunk names the role
                    begun.add(c.index)
                    if deltas and "content" in deltas[0]:
                        deltas[0] = {"role": "assistant", **deltas[0]}
                    else:
                        deltas.insert(0, {"role": "assistant", "content": None if deltas else ""})
                if not deltas and (finish is not None or logprobs and logprobs["content"]
                                   or c.index in verdicts):
                    deltas = [{}]
                for k, delta in enumerate(deltas):
                    last = k == len(deltas) - 1
                    choice = {"index": c.index, "delta": delta, "logprobs": logprobs if last else None,
                              "finish_reason": finish if last else None}
                    if last and c.index in verdicts:
                        choice["calibrated_abstention"] = verdicts[c.index].model_dump()
                    yield {**chunk, "choices": [choice], **usage_slot}
            if out.finished:
                track.tokens(out.prompt_tokens, out.completion_tokens)
                if include_usage:
                    yield {**chunk, "choices": [],
                           "usage": Usage.of(out.prompt_tokens, out.completion_tokens).model_dump()}
