"""OpenAI request and response shapes for the routes budwood serves (chat, completions, models).

Field names, defaults and limits follow the OpenAI API; vLLM's extra sampling fields (top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids) are accepted too, and budwood's own
`calibrated_abstention` (a choice then says whether it abstained, in its `calibrated_abstention`
object). A chat request's every field is honoured or refused by name, never ignored (a request changed
without telling its caller is the worst answer): the fields below that budwood does not implement are
refused with a 400 naming them (CHAT_REFUSED), a few are accepted only with the value that asks for
what budwood does anyway (CHAT_ONLY), and any other field the model does not declare is refused as
unknown (serve/chat.py `refuse_unsupported`). A field sent empty (null, [], {}, "") counts as not sent. Completion
requests follow the same policy with their own tables (COMPLETION_REFUSED, COMPLETION_ONLY; `refuse_unsupported`
here): lm-evaluation-harness passes a task's generation_kwargs through into the request, and one budwood does
not implement must fail by name rather than change the evaluation unseen.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from budwood.errors import BudwoodError


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")  # include_obfuscation and the like: refused by name, not ignored
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    # budwood extension (send it as extra_body): answer with the adapter's abstention text where the answer's
    # confidence is below its calibrated threshold (calibration.json); null: the adapter's default
    calibrated_abstention: bool | None = None


class ChatMessage(BaseModel):
    """One message of a chat request: an assistant's `tool_calls` and a tool result's `tool_call_id` are
    rendered by the chat template; other fields (`name`, `function_call`, ...) are kept (extra="allow") so
    that serve/chat.py can refuse them by name rather than drop them."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Sampling):
    """Fields not declared here are kept (extra="allow") for serve/chat.py to refuse by name."""

    model_config = ConfigDict(extra="allow")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True  # vLLM's
    request_id: str | None = Field(None, min_length=1, max_length=128)  # vLLM's: the answer's id is chatcmpl-{it}
    tools: list[Any] | None = None  # OpenAI tool objects; checked in serve/tools.py
    tool_choice: str | dict[str, Any] | None = None  # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool | None = None


_LEGACY = "OpenAI's deprecated function calling; send tools and tool_choice"
_GUIDED = "use response_format (json_object or json_schema), which budwood constrains with its grammar"
# Fields of OpenAI's and vLLM's chat request that budwood does not implement, with why: refused by name (400,
# `param` the field) unless null. docs/serving.md "Chat request fields" lists them.
CHAT_REFUSED: dict[str, str] = {
    # OpenAI
    "functions": _LEGACY,
    "audio": "budwood serve answers in text only",
    "metadata": "budwood serve stores no completions, so it has nowhere to keep metadata",
    "moderation": "budwood serve runs no moderation",
    "prediction": "predicted outputs are not supported",
    "prompt_cache_key": "budwood's prefix cache is automatic (kept apart per tenant) and takes no key",
    "prompt_cache_retention": "budwood's prefix cache keeps blocks while memory allows; it takes no retention",
    "prompt_cache_options": "budwood's prefix cache is automatic and takes no options",
    "reasoning_effort": "budwood serves no reasoning models' effort setting",
    "verbosity": "budwood serve has no verbosity setting",
    "web_search_options": "budwood serve has no web search",
    "user": "budwood serve keeps no per-user records (OpenAI's use of it: abuse monitoring)",
    "safety_identifier": "budwood serve keeps no per-user records (OpenAI's use of it: abuse monitoring)",
    # vLLM
    "best_of": "on chat, use n",
    "length_penalty": "budwood has no beam search",
    "spaces_between_special_tokens": "budwood's output never holds special tokens (they are skipped)",
    "truncate_prompt_tokens": "budwood never truncates a prompt: one too long is refused",
    "prompt_logprobs": "prompt logprobs are served on /v1/completions (echo with logprobs), not on chat",
    "allowed_token_ids": "use logit_bias", "bad_words": "use logit_bias",
    "documents": "chat templates are given messages only",
    "chat_template": "the chat template is the model's or the adapter's own; requests cannot run their own",
    "chat_template_kwargs": "chat templates are given messages and add_generation_prompt only",
    "mm_processor_kwargs": "budwood serves text models only", "media_io_kwargs": "budwood serves text models only",
    "guided_json": _GUIDED, "guided_regex": _GUIDED, "guided_choice": _GUIDED, "guided_grammar": _GUIDED,
    "guided_decoding_backend": _GUIDED, "guided_whitespace_pattern": _GUIDED, "structural_tag": _GUIDED,
    "structured_outputs": _GUIDED,
    "logits_processors": "requests cannot run their own logits processors",
    "cache_salt": "budwood salts the prefix cache per tenant itself",
    "kv_transfer_params": "budwood has no disaggregated prefill", "vllm_xargs": "budwood takes no vLLM extra args",
    "include_reasoning": "budwood serves no reasoning models' reasoning content",
}
# Fields accepted only with these values, which ask for what budwood does anyway; any other is refused by
# name with the reason. Compared with their types (so 0 is not False).
CHAT_ONLY: dict[str, tuple[tuple, str]] = {
    "function_call": (("none",), _LEGACY),
    "modalities": ((["text"],), "budwood serve answers in text only"),
    "store": ((False,), "budwood serve stores no completions"),
    "service_tier": (("auto", "default"), "budwood serve has one tier"),
    "echo": ((False,), "echo is served on /v1/completions"),
    "include_stop_str_in_output": ((False,), "stop strings are always cut from the output"),
    "skip_special_tokens": ((True,), "special tokens are always skipped in the output"),
    "add_special_tokens": ((False,), "the chat template adds the special tokens; none are added after it"),
    "continue_final_message": ((False,), "the last message is never continued; send add_generation_prompt"),
    "use_beam_search": ((False,), "budwood has no beam search"),
    "min_tokens": ((0,), "budwood has no minimum length"),
    "priority": ((0,), "budwood schedules first come, first served"),
    "return_tokens_as_token_ids": ((False,), "logprobs give tokens as text"),
    "return_token_ids": ((False,), "answers give text, not token ids"),
}


class CompletionRequest(_Sampling):
    """Fields not declared here are kept (extra="allow") for `refuse_unsupported` to refuse by name."""

    model_config = ConfigDict(extra="allow")
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None
    response_format: dict[str, Any] | None = None
    request_id: str | None = Field(None, min_length=1, max_length=128)  # vLLM's: the answer's id is cmpl-{it}


# vLLM's completion request fields that budwood does not implement (OpenAI's are all honoured but `user`):
# refused by name unless null. docs/serving.md "Completion request fields" lists them.
COMPLETION_REFUSED: dict[str, str] = {
    **{name: CHAT_REFUSED[name] for name in (
        "user", "length_penalty", "spaces_between_special_tokens", "truncate_prompt_tokens", "allowed_token_ids",
        "bad_words", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
        "guided_whitespace_pattern", "structural_tag", "structured_outputs", "logits_processors", "cache_salt",
        "kv_transfer_params", "vllm_xargs")},
    "prompt_logprobs": "send echo=true with logprobs: each choice's logprobs then start with the prompt's",
    "prompt_embeds": "send the prompt as text or token ids",
}
COMPLETION_ONLY: dict[str, tuple[tuple, str]] = {
    **{name: CHAT_ONLY[name] for name in ("include_stop_str_in_output", "skip_special_tokens", "use_beam_search",
                                          "min_tokens", "priority", "return_tokens_as_token_ids", "return_token_ids")},
    "add_special_tokens": ((True,), "a text prompt gets the tokenizer's special tokens (its BOS), as vLLM's default "
                                    "does; send token ids for a prompt without them"),
}


def is_empty(value) -> bool:
    """A field that says nothing (null, or an empty list, object or string): nothing is lost by not using it."""
    return value is None or (isinstance(value, list | dict | str) and not value)


def refuse_unsupported(body: BaseModel, refused: dict[str, str], only: dict[str, tuple[tuple, str]],
                       route: str) -> None:
    """Refuse by name (400, `param` the field) every sent field budwood does not implement: one in `refused`,
    one in `only` with another value, and any the request model does not declare (kept by extra="allow").
    A field sent empty counts as not sent; `only` values compare with their types, so 0 is not False."""
    for name, value in body.model_dump(exclude_unset=True).items():
        if value is None or (name not in only and is_empty(value)):
            continue
        if name in refused:
            raise BudwoodError(f"{name}: not supported by budwood serve ({refused[name]})", param=name,
                               code="unsupported_parameter")
        if name in only:
            allowed, why = only[name]
            if not any(type(value) is type(a) and value == a for a in allowed):
                shown = " or ".join(repr(a) for a in allowed)
                raise BudwoodError(f"{name}: only {shown} is supported by budwood serve ({why}); got {value!r}",
                                   param=name, code="unsupported_value")
        elif name not in type(body).model_fields:
            raise BudwoodError(f"{name}: not a {route} field that budwood serve implements", param=name,
                               code="unsupported_parameter")


class LoadAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    lora_name: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """A route's refusal with an exact status and error `type` that no kind names; answered as it is.
    Refusals a domain can name raise `BudwoodError` with a kind instead (serve/errors.py)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class ModelCard(BaseModel):
    """One entry of /v1/models: the base (`parent` None) or an adapter over it."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    in_flight: int


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = Field(None, exclude_if=lambda v: v is None)  # sent only with calls, as
    # OpenAI does


class AbstentionVerdict(BaseModel):
    """budwood's extra field on a choice when calibrated abstention applied to it: whether the answer
    was replaced by the abstention text, its confidence, and the threshold it was held to."""

    abstained: bool
    confidence: float
    threshold: float
    score: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    calibrated_abstention: AbstentionVerdict | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    created: int
    model: str
    system_fingerprint: str
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    calibrated_abstention: AbstentionVerdict | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage
