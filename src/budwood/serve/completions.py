"""/v1/completions: one or more prompts (text or token ids), each with n choices.

Choice `i` of prompt `p` has index `p * n + i`, as OpenAI numbers them. With `echo`, a choice's text
starts with its prompt, and its logprobs with the prompt's (the first token has none): what
lm-evaluation-harness's `local-completions` reads to score continuations (it sends echo, logprobs=1,
max_tokens=1, temperature=0 and a seed, and reads token_logprobs[ctxlen:-1]). Every request field is honoured
or refused by name (protocol.py COMPLETION_REFUSED, COMPLETION_ONLY), as chat's are: lm-evaluation-harness
passes a task's generation_kwargs through as request fields. Calibrated abstention (`calibrated_abstention`)
judges each generated text as chat does (serve/chat.py); an echoed prompt stays in front of the abstention text.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from budwood.engine import merge_outputs
from budwood.errors import BudwoodError
from budwood.serve.auth import Caller
from budwood.serve.limits import check_completion, check_prompt_tokens
from budwood.serve.protocol import (
    COMPLETION_ONLY,
    COMPLETION_REFUSED,
    AbstentionVerdict,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    new_id,
    now,
    refuse_unsupported,
)
from budwood.serve.sse import stream_response

if TYPE_CHECKING:
    from budwood.engine import RequestOutput, SamplingParams
    from budwood.eval.confidence import AbstentionPolicy
    from budwood.serve.serving import OpenAIServing


def prompt_ids(serving: OpenAIServing, body: CompletionRequest) -> list[list[int]]:
    """Each prompt as token ids; text prompts get the tokenizer's BOS, as HF and vLLM give them."""
    p, encode = body.prompt, serving.engine.encode
    if isinstance(p, str):
        prompts = [encode(p, add_special_tokens=True)]
    elif p and all(isinstance(x, str) for x in p):
        prompts = [encode(x, add_special_tokens=True) for x in p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    elif p and all(isinstance(x, list) for x in p):
        prompts = [list(x) for x in p]
    else:
        raise BudwoodError("prompt must be a string, a list of strings, a list of token ids or a list of "
                           "lists of token ids, and not empty", param="prompt")
    if any(not x for x in prompts):
        raise BudwoodError("a prompt is empty", param="prompt")
    return prompts


async def create_completion(serving: OpenAIServing, body: CompletionRequest, caller: Caller, request: Request):
    started = time.perf_counter()
    refuse_unsupported(body, COMPLETION_REFUSED, COMPLETION_ONLY, "completions")
    check_completion(serving.limits, body)  # counts and lengths first, before anything is loaded
    adapter = await serving.resolve(caller, body.model)
    prompts = await asyncio.to_thread(prompt_ids, serving, body)  # tokenising takes a while: off the event loop
    check_prompt_tokens(serving.limits, "prompt", prompts)
    if body.max_tokens == 0 and not body.echo:
        raise BudwoodError("max_tokens=0 only makes sense with echo=true", param="max_tokens")
    if body.stream and body.echo and body.logprobs is not None:
        raise BudwoodError("echo with logprobs is not supported when streaming", param="echo")
    policy = await serving.abstention_policy(adapter, body.calibrated_abstention)
    if policy is not None and body.max_tokens == 0:
        raise BudwoodError("calibrated_abstention judges generated text; max_tokens=0 generates none (set "
                           "calibrated_abstention=false)", param="calibrated_abstention")
    params = serving.sampling_params(body, body.max_tokens, serving.internal_logprobs(body.logprobs, policy),
                                     body.logprobs if body.echo and body.logprobs is not None else None,
                                     await serving.grammar(body.response_format), caller.tenant)
    head = {"id": f"cmpl-{body.request_id}" if body.request_id else new_id("cmpl"), "object": "text_completion",
            "created": now(), "model": body.model, "system_fingerprint": serving.engine.system_fingerprint}
    held = Held(policy, [{} for _ in prompts])
    if body.stream:
        return await stream_response(_chunks(serving, body, head, prompts, params, adapter, started, held))
    with serving.metrics.track(body.model, "completions", started) as track:
        finals = await _generate_all(serving, request, prompts, params, adapter, held)
        prompt_tokens, generated = sum(f.prompt_tokens for f in finals), sum(f.completion_tokens for f in finals)
        track.tokens(prompt_tokens, generated)
    choices = [choice for pi, (ids, final) in enumerate(zip(prompts, finals))
               for choice in _choices(serving, body, pi, ids, final, held.verdicts[pi])]
    return CompletionResponse(**head, choices=choices, usage=Usage.of(prompt_tokens, generated))


@dataclass
class Held:
    """A request's calibrated abstention: its policy (None: off) and each prompt's verdicts by choice index."""

    policy: AbstentionPolicy | None
    verdicts: list[dict[int, AbstentionVerdict]]


async def _generate_all(serving: OpenAIServing, request: Request, prompts: list[list[int]], params: SamplingParams,
                        adapter, held: Held) -> list[RequestOutput]:
    """Every prompt's merged output; one prompt failing cancels (aborts) the others."""
    async def one(pi: int, ids: list[int]) -> RequestOutput:
        final = None
        outputs = serving.generate_held(ids, params, adapter, held.policy, held.verdicts[pi])
        for out in await serving.collect(request, outputs):
            final = merge_outputs(final, out)
        return final

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(pi, ids)) for pi, ids in enumerate(prompts)]
    except* BudwoodError as errors:
        raise errors.exceptions[0] from None
    return [t.result() for t in tasks]


def _choices(serving: OpenAIServing, body: CompletionRequest, pi: int, ids: list[int], final: RequestOutput,
             verdicts: dict[int, AbstentionVerdict]) -> list[CompletionChoice]:
    """Prompt `pi`'s choices; with echo, its text and (when asked) its logprobs come first."""
    prompt_text = serving.engine.tokenizer.decode(ids) if body.echo else ""
    echoed = (serving.completion_logprobs(final.prompt_logprobs or [None] * len(ids), ids, 0)
              if body.echo and body.logprobs is not None else None)  # the same for each of the n choices
    choices = []
    for c in final.choices:
        logprobs = None
        if body.logprobs is not None:
            logprobs = serving.completion_logprobs(c.logprobs, c.token_ids, len(prompt_text))
            if echoed is not None:
                logprobs = {k: echoed[k] + logprobs[k] for k in echoed}
        choices.append(CompletionChoice(index=pi * body.n + c.index, text=prompt_text + c.text, logprobs=logprobs,
                                        finish_reason=c.finish_reason, calibrated_abstention=verdicts.get(c.index)))
    return choices


async def _chunks(serving: OpenAIServing, body: CompletionRequest, head: dict, prompts: list[list[int]],
                  params: SamplingParams, adapter, started: float, held: Held) -> AsyncIterator[dict]:
    """The prompts one after another; with echo, each choice's prompt text is its first chunk."""
    n, usage_slot = body.n, {"usage": None} if body.stream_options and body.stream_options.include_usage else {}
    prompt_tokens = generated = 0
    with serving.metrics.track(body.model, "completions", started) as track:
        for pi, ids in enumerate(prompts):
            if body.echo:
                text = serving.engine.tokenizer.decode(ids)
                for i in range(n):
                    yield {**head, "choices": [{"index": pi * n + i, "text": text, "logprobs": None,
                                                "finish_reason": None}], **usage_slot}
            async for out in serving.generate_held(ids, params, adapter, held.policy, held.verdicts[pi]):
                for c in out.choices:
                    logprobs = (serving.completion_logprobs(c.logprobs, c.token_ids, 0)
                                if body.logprobs is not None else None)
                    choice = {"index": pi * n + c.index, "text": c.text, "logprobs": logprobs,
                              "finish_reason": c.finish_reason}
                    if c.index in held.verdicts[pi]:
                        choice["calibrated_abstention"] = held.verdicts[pi][c.index].model_dump()
                    yield {**head, "choices": [choice], **usage_slot}
                if out.finished:
                    prompt_tokens += out.prompt_tokens
                    generated += out.completion_tokens
        track.tokens(prompt_tokens, generated)
        if usage_slot:
            yield {**head, "choices": [], "usage": Usage.of(prompt_tokens, generated).model_dump()}
