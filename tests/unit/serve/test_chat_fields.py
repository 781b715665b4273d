"""Every chat-completions request field is honoured or refused by name, never ignored.

The walk covers OpenAI's request (its field names read from the installed `openai` client's own types, so
it follows the client's version) and vLLM's extra chat fields. Each is sent with a plausible value to the
in-process app over budwood-tiny: the answer is either 2xx, with `Honoured.by` naming what honours the field
and, where it is cheap to see, a check of its effect; or a 400 in OpenAI's error shape whose `param` is the
field. A field the client gains that no case covers fails `test_every_field_has_a_case`.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types.chat.completion_create_params import CompletionCreateParamsStreaming

from budwood.engine import Engine, EngineConfig
from budwood.models.load import load_tokenizer
from budwood.serve import create_app
from budwood.serve.protocol import CHAT_ONLY, CHAT_REFUSED, ChatCompletionRequest

BASE = "budwood-tiny"
OPENAI_FIELDS = set(CompletionCreateParamsStreaming.__annotations__)  # the request's fields, `stream` included
# vLLM's extra fields on /v1/chat/completions (its ChatCompletionRequest, late 2025)
VLLM_FIELDS = {
    "best_of", "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "prompt_logprobs", "allowed_token_ids", "bad_words", "echo", "add_generation_prompt",
    "continue_final_message", "add_special_tokens", "documents", "chat_template", "chat_template_kwargs",
    "mm_processor_kwargs", "media_io_kwargs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "guided_decoding_backend", "guided_whitespace_pattern", "structural_tag", "structured_outputs", "priority",
    "request_id", "logits_processors", "return_tokens_as_token_ids", "return_token_ids", "cache_salt",
    "kv_transfer_params", "vllm_xargs", "include_reasoning",
}
MESSAGES = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "order_status", "parameters": {"type": "object", "properties": {}}}}
REFUND = {"type": "function", "function": {"name": "refund", "parameters": {
    "type": "object", "properties": {"order_id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"}},
    "required": ["order_id"], "additionalProperties": False}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "order_status", "arguments": "{}"}}
TOOLS = {"tools": [TOOL, REFUND], "max_tokens": 64}


@dataclass(frozen=True)
class Sent:
    """One request's answer, and the app to ask again (for checks that compare with another request)."""

    status: int
    body: Any  # the JSON answer, or the SSE events' JSON for a stream
    post: Callable[[dict], Sent]


@dataclass(frozen=True)
class Honoured:
    by: str  # what in budwood honours the field
    check: Callable[[Sent], None] | None = None  # its effect, where it is cheap to see


REFUSED = None


@dataclass(frozen=True)
class Case:
    field: str
    value: Any
    verdict: Honoured | None  # REFUSED: a 400 naming the field
    with_: dict | None = None  # other fields the case needs (ignore_eos for exact token counts)

    @property
    def id(self) -> str:
        return f"{self.field}={json.dumps(self.value)[:24]}"


def usage(s: Sent) -> dict:
    return s.body["usage"]


def baseline(s: Sent, **fields) -> Sent:
    return s.post({"model": BASE, "messages": MESSAGES, "max_tokens": 1, **fields})


def check_messages(s: Sent) -> None:
    assert usage(s)["prompt_tokens"] > usage(baseline(s))["prompt_tokens"]


def check_stream(s: Sent) -> None:
    assert s.body[0]["object"] == "chat.completion.chunk" and s.body[0]["choices"][0]["delta"]["role"] == "assistant"


def check_stream_usage(s: Sent) -> None:
    assert s.body[-1]["choices"] == [] and s.body[-1]["usage"]["completion_tokens"] >= 1


def check_seed(s: Sent) -> None:
    again = s.post({"model": BASE, "messages": MESSAGES, "max_tokens": 2, "temperature": 1.0, "seed": 7})
    assert again.body["choices"][0]["message"] == s.body["choices"][0]["message"]


def check_logit_bias(s: Sent) -> None:
    assert text(s) == TOKENIZER.decode([FORCED])


def text(s: Sent) -> str:
    return s.body["choices"][0]["message"]["content"]


def check_model(s: Sent) -> None:
    assert s.body["model"] == BASE


def check_n(s: Sent) -> None:
    assert len(s.body["choices"]) == 2


def check_logprobs(s: Sent) -> None:
    assert len(s.body["choices"][0]["logprobs"]["content"]) == usage(s)["completion_tokens"]


def check_top_logprobs(s: Sent) -> None:
    assert all(len(t["top_logprobs"]) == 2 for t in s.body["choices"][0]["logprobs"]["content"])


def check_stopped_by_token(s: Sent) -> None:
    assert text(s) == "" and s.body["choices"][0]["finish_reason"] == "stop"  # a stop token adds no text


def check_no_generation_prompt(s: Sent) -> None:
    assert usage(s)["prompt_tokens"] < usage(baseline(s))["prompt_tokens"]


def check_request_id(s: Sent) -> None:
    assert s.body["id"] == "chatcmpl-walk-1"


def check_no_tool_calls(s: Sent) -> None:
    choice = s.body["choices"][0]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] in ("stop", "length")


def check_shows_tools(s: Sent) -> None:
    assert usage(s)["prompt_tokens"] > usage(baseline(s))["prompt_tokens"] + 20  # the template lists the tools


def calls(s: Sent) -> list[dict]:
    return s.body["choices"][0]["message"].get("tool_calls") or []


def check_forced_call(s: Sent) -> None:
    """tool_choice required (or tools with it): a call to a declared function whose arguments parse."""
    assert [c["function"]["name"] for c in calls(s)][:1] == ["order_status"]
    assert all(isinstance(json.loads(c["function"]["arguments"]), dict) for c in calls(s))
    assert s.body["choices"][0]["finish_reason"] == "tool_calls"


def check_named_call(s: Sent) -> None:
    """A named function: exactly one call to it, and finish_reason "stop" as OpenAI sends it."""
    assert [c["function"]["name"] for c in calls(s)] == ["refund"]
    assert s.body["choices"][0]["finish_reason"] == "stop"


def check_one_call(s: Sent) -> None:
    assert len(calls(s)) == 1


def check_calls_only(s: Sent) -> None:
    """One or more calls: the untrained base may write calls until max_tokens, but never anything else."""
    choice = s.body["choices"][0]
    if choice["finish_reason"] == "length":
        assert choice["message"]["content"].startswith('<tool_call>\n{"name": "')
    else:
        check_forced_call(s)


def check_json_object(s: Sent) -> None:
    assert text(s).startswith("{")  # free text from this prompt starts with a word


def tokens(n: int) -> Callable[[Sent], None]:
    def check(s: Sent) -> None:
        assert usage(s)["completion_tokens"] == n
    return check


TOKENIZER = load_tokenizer(BASE)
FORCED = TOKENIZER.encode(" ha", add_special_tokens=False)[0]  # a plain token that logit_bias +100 forces
EOS = {str(TOKENIZER.eos_token_id): 100}  # logit_bias that ends every answer at once, but for ignore_eos
SAMPLING = "engine SamplingParams"
CASES = [
    # OpenAI's fields that budwood honours
    Case("model", BASE, Honoured("the base or the adapter it names", check_model)),
    Case("messages", [{"role": "system", "content": "Be brief."}, *MESSAGES],
         Honoured("the chat template", check_messages)),
    Case("max_tokens", 1, Honoured(SAMPLING + ".max_tokens", tokens(1)), {"ignore_eos": True}),
    Case("max_completion_tokens", 2, Honoured(SAMPLING + ".max_tokens", tokens(2)), {"ignore_eos": True}),
    Case("n", 2, Honoured(SAMPLING + ".n", check_n)),
    Case("temperature", 0.0, Honoured(SAMPLING + ".temperature (0: greedy)")),
    Case("top_p", 0.5, Honoured(SAMPLING + ".top_p")),
    Case("presence_penalty", 0.5, Honoured(SAMPLING + ".presence_penalty")),
    Case("frequency_penalty", 0.5, Honoured(SAMPLING + ".frequency_penalty")),
    Case("logit_bias", {str(FORCED): 100}, Honoured(SAMPLING + ".logit_bias", check_logit_bias),
         {"max_tokens": 1, "temperature": 1.0}),
    Case("seed", 7, Honoured(SAMPLING + ".seed", check_seed), {"temperature": 1.0}),
    Case("stop", ["\n"], Honoured(SAMPLING + ".stop (engine/output.py cuts the text there)")),
    Case("logprobs", True, Honoured("OpenAIServing.chat_logprobs", check_logprobs)),
    Case("top_logprobs", 2, Honoured("OpenAIServing.chat_logprobs", check_top_logprobs), {"logprobs": True}),
    Case("response_format", {"type": "json_object"}, Honoured("the grammar compiler", check_json_object)),
    Case("stream", True, Honoured("serve/sse.py", check_stream)),
    Case("stream_options", {"include_usage": True}, Honoured("chat._chunks", check_stream_usage), {"stream": True}),
    Case("tools", [TOOL], Honoured("the chat template (tools=) and serve/tools.py", check_shows_tools)),
    Case("tool_choice", "none", Honoured("serve/tools.py: tools shown, text answered", check_no_tool_calls),
         {"tools": [TOOL]}),
    Case("tool_choice", "auto", Honoured("serve/tools.py: calls parsed from the text (engine/tools.py)"),
         {"tools": [TOOL]}),
    Case("tool_choice", "required", Honoured("the tool-call grammar", check_forced_call),
         {**TOOLS, "parallel_tool_calls": False}),
    Case("tool_choice", {"type": "function", "function": {"name": "refund"}},
         Honoured("the tool-call grammar, one function", check_named_call), TOOLS),
    Case("tool_choice", {"type": "function", "function": {"name": "nope"}}, REFUSED, TOOLS),
    Case("parallel_tool_calls", False, Honoured("the tool-call grammar: one call", check_one_call),
         {**TOOLS, "tool_choice": "required"}),
    Case("parallel_tool_calls", True, Honoured("the tool-call grammar: one or more calls", check_calls_only),
         {**TOOLS, "tool_choice": "required"}),
    # accepted only where the value asks for what budwood does anyway
    Case("function_call", "none", Honoured("no functions can be given, so none is called", check_no_tool_calls)),
    Case("function_call", "auto", REFUSED),
    Case("modalities", ["text"], Honoured("budwood answers in text")),
    Case("modalities", ["text", "audio"], REFUSED),
    Case("store", False, Honoured("budwood stores no completions")),
    Case("store", True, REFUSED),
    Case("service_tier", "auto", Honoured("budwood's one tier")),
    Case("service_tier", "flex", REFUSED),
    # OpenAI's fields that budwood refuses
    Case("functions", [TOOL["function"]], REFUSED),
    Case("audio", {"voice": "alloy", "format": "wav"}, REFUSED),
    Case("metadata", {"team": "support"}, REFUSED),
    Case("moderation", {"model": "omni-moderation-latest"}, REFUSED),
    Case("prediction", {"type": "content", "content": "Hello"}, REFUSED),
    Case("prompt_cache_key", "support-bot", REFUSED),
    Case("prompt_cache_retention", "24h", REFUSED),
    Case("prompt_cache_options", {"mode": "explicit"}, REFUSED),
    Case("reasoning_effort", "low", REFUSED),
    Case("verbosity", "low", REFUSED),
    Case("web_search_options", {"search_context_size": "low"}, REFUSED),
    Case("user", "user-1234", REFUSED),
    Case("safety_identifier", "user-1234", REFUSED),
    # vLLM's fields that budwood honours
    Case("top_k", 1, Honoured(SAMPLING + ".top_k")),
    Case("min_p", 0.1, Honoured(SAMPLING + ".min_p")),
    Case("repetition_penalty", 1.2, Honoured(SAMPLING + ".repetition_penalty")),
    Case("ignore_eos", True, Honoured(SAMPLING + ".ignore_eos", tokens(2)), {"logit_bias": EOS, "max_tokens": 2}),
    Case("stop_token_ids", [FORCED], Honoured(SAMPLING + ".stop_token_ids", check_stopped_by_token),
         {"logit_bias": {str(FORCED): 100}}),
    Case("add_generation_prompt", False, Honoured("Engine.chat_prompt", check_no_generation_prompt)),
    Case("request_id", "walk-1", Honoured("chat.create_chat_completion: the answer's id", check_request_id)),
    # vLLM's fields accepted only with the value that asks for what budwood does anyway
    Case("echo", False, Honoured("chat never echoes")),
    Case("echo", True, REFUSED),
    Case("include_stop_str_in_output", False, Honoured("engine/output.py cuts stop strings")),
    Case("include_stop_str_in_output", True, REFUSED),
    Case("skip_special_tokens", True, Honoured("engine/output.py decodes with skip_special_tokens")),
    Case("skip_special_tokens", False, REFUSED),
    Case("add_special_tokens", False, Honoured("Engine.chat_prompt tokenises with add_special_tokens=False")),
    Case("add_special_tokens", True, REFUSED),
    Case("continue_final_message", False, Honoured("the last message is never continued")),
    Case("continue_final_message", True, REFUSED),
    Case("use_beam_search", False, Honoured("budwood samples")),
    Case("use_beam_search", True, REFUSED),
    Case("min_tokens", 0, Honoured("no minimum length")),
    Case("min_tokens", 4, REFUSED),
    Case("priority", 0, Honoured("first come, first served")),
    Case("priority", 5, REFUSED),
    Case("return_tokens_as_token_ids", False, Honoured("logprobs give tokens as text")),
    Case("return_tokens_as_token_ids", True, REFUSED),
    Case("return_token_ids", False, Honoured("answers give text")),
    Case("return_token_ids", True, REFUSED),
    # vLLM's fields that budwood refuses
    Case("best_of", 2, REFUSED),
    Case("length_penalty", 1.5, REFUSED),
    Case("spaces_between_special_tokens", False, REFUSED),
    Case("truncate_prompt_tokens", 32, REFUSED),
    Case("prompt_logprobs", 1, REFUSED),
    Case("allowed_token_ids", [1, 2, 3], REFUSED),
    Case("bad_words", ["refund"], REFUSED),
    Case("documents", [{"title": "Policy", "text": "Refunds within 30 days."}], REFUSED),
    Case("chat_template", "{{ messages[0]['content'] }}", REFUSED),
    Case("chat_template_kwargs", {"enable_thinking": False}, REFUSED),
    Case("mm_processor_kwargs", {"num_crops": 4}, REFUSED),
    Case("media_io_kwargs", {"video": {"num_frames": 8}}, REFUSED),
    Case("guided_json", {"type": "object"}, REFUSED),
    Case("guided_regex", "[a-z]+", REFUSED),
    Case("guided_choice", ["yes", "no"], REFUSED),
    Case("guided_grammar", 'root ::= "yes" | "no"', REFUSED),
    Case("guided_decoding_backend", "xgrammar", REFUSED),
    Case("guided_whitespace_pattern", r"\s*", REFUSED),
    Case("structural_tag", '{"type": "structural_tag"}', REFUSED),
    Case("structured_outputs", {"json": {"type": "object"}}, REFUSED),
    Case("logits_processors", ["my_module.Processor"], REFUSED),
    Case("cache_salt", "salt-1", REFUSED),
    Case("kv_transfer_params", {"do_remote_prefill": True}, REFUSED),
    Case("vllm_xargs", {"my_arg": 1}, REFUSED),
    Case("include_reasoning", True, REFUSED),
]


@pytest.fixture(scope="module")
def client():
    engine = Engine(EngineConfig(precision="fp32", max_batch_tokens=128))
    with TestClient(create_app(engine=engine)) as c:
        yield c


def post(client: TestClient, body: dict) -> Sent:
    r = client.post("/v1/chat/completions", json=body)
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        answer = [json.loads(e) for e in events[:-1]]
    else:
        answer = r.json()
    return Sent(r.status_code, answer, lambda b: post(client, b))


def assert_refused(s: Sent, param: str) -> None:
    assert s.status == 400, s.body
    error = s.body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and param in error["message"]


def test_every_field_has_a_case():
    covered = {c.field for c in CASES}
    assert OPENAI_FIELDS - covered == set(), "the openai client has fields no case covers"
    assert VLLM_FIELDS - covered == set()
    # and budwood's own tables and request model stay inside the walk (calibrated_abstention: budwood's own,
    # tested in tests/e2e/test_calibration.py)
    declared = set(ChatCompletionRequest.model_fields) - {"calibrated_abstention"}
    assert (set(CHAT_REFUSED) | set(CHAT_ONLY) | declared) - covered == set()


def test_a_field_accepted_only_with_one_value_is_walked_both_ways():
    for name in CHAT_ONLY:
        verdicts = {c.verdict is REFUSED for c in CASES if c.field == name}
        assert verdicts == {True, False}, name


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_each_field_is_honoured_or_refused_by_name(client, case: Case):
    body = {"model": BASE, "messages": MESSAGES, "max_tokens": 2, "temperature": 0.0, **(case.with_ or {}),
            case.field: case.value}
    sent = post(client, body)
    if case.verdict is REFUSED:
        assert_refused(sent, case.field)
        return
    assert sent.status == 200, sent.body
    assert case.verdict.by
    if case.verdict.check is not None:
        case.verdict.check(sent)


@pytest.mark.parametrize("field", ["tools", "tool_choice", "guided_json", "structured_outputs", "user", "metadata"])
def test_a_field_sent_as_null_counts_as_not_sent(client, field):
    assert post(client, {"model": BASE, "messages": MESSAGES, "max_tokens": 1, field: None}).status == 200


@pytest.mark.parametrize("field, value", [("tools", []), ("metadata", {}), ("user", "")])
def test_an_empty_refused_field_says_nothing_and_is_accepted(client, field, value):
    assert post(client, {"model": BASE, "messages": MESSAGES, "max_tokens": 1, field: value}).status == 200


def test_an_unknown_field_is_refused_by_name(client):
    assert_refused(post(client, {"model": BASE, "messages": MESSAGES, "max_tokens": 1, "temprature": 0.2}),
                   "temprature")


def test_an_unknown_stream_option_is_refused_by_name(client):
    s = post(client, {"model": BASE, "messages": MESSAGES, "max_tokens": 1, "stream": True,
                      "stream_options": {"include_usage": True, "include_obfuscation": True}})
    assert_refused(s, "stream_options.include_obfuscation")


@pytest.mark.parametrize("history, param", [
    ([*MESSAGES, {"role": "assistant", "content": None, "function_call": CALL["function"]}],
     "messages.1.function_call"),
    ([*MESSAGES, {"role": "tool", "tool_call_id": "call_1", "content": "shipped"}], "messages.1.tool_call_id"),
    ([*MESSAGES, {"role": "tool", "content": "shipped"}], "messages.1.tool_call_id"),
    ([*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [{**CALL, "function": {"name": "x"}}]}],
     "messages.1"),
    ([*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [{**CALL, "function": {
        "name": "order_status", "arguments": "{not json"}}]}], "messages.1"),
    ([*MESSAGES, {"role": "user", "content": None, "tool_calls": [CALL]}], "messages.1.tool_calls"),
    ([*MESSAGES, {"role": "function", "name": "order_status", "content": "shipped"}], "messages.1.role"),
    ([{"role": "user", "content": "Hi", "name": "alice"}], "messages.0.name"),
    ([{"role": "user", "content": "Hi", "tool_call_id": "call_1"}], "messages.0.tool_call_id"),
])
def test_bad_tool_history_and_other_message_fields_are_refused_not_dropped(client, history, param):
    s = post(client, {"model": BASE, "messages": history, "max_tokens": 1})
    assert_refused(s, param)


def test_tool_calls_and_results_in_the_history_are_rendered_not_dropped(client):
    called = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [CALL]}]
    answered = [*called, {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'}]
    sizes = []
    for history in (MESSAGES, called, answered):
        s = post(client, {"model": BASE, "messages": history, "tools": [TOOL], "max_tokens": 1})
        assert s.status == 200, s.body
        sizes.append(usage(s)["prompt_tokens"])
    assert sizes[0] < sizes[1] < sizes[2]


def test_an_assistant_message_with_empty_tool_calls_is_plain_text(client):
    """The shape an OpenAI client gives back for an answer with no calls: nothing is dropped, so it is served."""
    history = [*MESSAGES, {"role": "assistant", "content": "Hello.", "tool_calls": [], "function_call": None,
                           "refusal": None, "audio": None}, {"role": "user", "content": "More."}]
    assert post(client, {"model": BASE, "messages": history, "max_tokens": 1}).status == 200
