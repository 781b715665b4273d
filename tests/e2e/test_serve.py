"""`budwood serve` end to end: a real uvicorn server on loopback, driven by the official `openai` client
(httpx only where the client cannot say it: raw SSE, malformed bodies, the non-OpenAI routes).

Four engines are loaded once for the module: the main fp32 server over a copy of the `tiny_adapters`
folder (hot-load tests add and remove directories in it), a bf16 server for batch invariance, a
guarded server (api key, max_queue=2) and a bare `Engine` used as the reference for scores.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from conftest import running

from budwood.engine import Engine, EngineConfig
from budwood.serve.app import create_app

BASE = "budwood-tiny"
ADAPTERS = ["alpha", "beta", "gamma"]
API_KEY = "sk-budwood-test"
ERROR_FIELDS = {"message", "type", "param", "code"}
# longer than one 64-token KV block, so requests sharing it hit the prefix cache
SYSTEM = ("You are a careful narrator of old adventure stories. You answer in plain English, in short "
          "sentences, without lists or headings, and you never mention that you are a program. When the "
          "question is about a ship, an island or a treasure, you tell what the captain saw first, then what "
          "the crew did, and you end with the weather on the following morning.")
PROMPTS = ["Tell me about the island.", "Who was the captain?", "What did the crew find?", "Describe the storm."]


@dataclass
class Served:
    url: str
    engine: Engine | None = None
    folder: Path | None = None

    def client(self, api_key: str = "x") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def async_client(self, api_key: str = "x") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def served(tiny_adapters, tmp_path_factory) -> Iterator[Served]:
    """The main fp32 server, over its own copy of the adapters folder."""
    folder = tmp_path_factory.mktemp("served") / "adapters"
    shutil.copytree(tiny_adapters, folder)
    engine = Engine(EngineConfig(precision="fp32", adapters=str(folder)))
    with running(create_app(engine=engine)) as url:
        yield Served(url, engine, folder)


@pytest.fixture(scope="module")
def served_bf16(tiny_adapters) -> Iterator[Served]:
    with running(create_app(EngineConfig(precision="bf16", adapters=str(tiny_adapters)))) as url:
        yield Served(url)


@pytest.fixture(scope="module")
def guarded() -> Iterator[Served]:
    """A server that wants an API key and admits two requests at a time."""
    with running(create_app(EngineConfig(precision="fp32", max_queue=2), api_key=API_KEY)) as url:
        yield Served(url)


@pytest.fixture(scope="module")
def scorer(tiny_adapters) -> Engine:
    """A second fp32 engine, never served: the reference for prompt log-probabilities."""
    return Engine(EngineConfig(precision="fp32", adapters=str(tiny_adapters), kv_cache_tokens=4096))


def ask(text: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def chat(client: openai.OpenAI, model: str = BASE, prompt: str = "Tell me a story.", **kw):
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=model, messages=ask(prompt), **kw)


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def sample(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def busy(url: str) -> tuple[int, float, float]:
    """(requests in flight, sequences running, sequences waiting): all 0 when the server is idle."""
    m = scrape(url)
    return (httpx.get(f"{url}/health").json()["in_flight"], m[("budwood_requests_running", ())],
            m[("budwood_requests_waiting", ())])


def idle_within(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while busy(url) != (0, 0, 0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# -- /v1/models --------------------------------------------------------------------------------------
def test_models_lists_the_base_and_each_adapter_with_the_base_as_parent(served):
    models = {m.id: m for m in served.client().models.list()}
    assert {BASE, *ADAPTERS} <= set(models)
    assert models[BASE].model_extra["parent"] is None
    for name in ADAPTERS:
        assert models[name].model_extra["parent"] == BASE and models[name].object == "model"


def test_models_retrieve_one_and_unknown_is_404(served):
    client = served.client()
    alpha = client.models.retrieve("alpha")
    assert alpha.id == "alpha" and alpha.model_extra["parent"] == BASE
    assert client.models.retrieve(BASE).model_extra["parent"] is None
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-adapter")
    assert e.value.code == "model_not_found"


# -- chat completions ----------------------------------------------------------------------------------
def test_chat_completion_content_usage_and_fingerprint(served):
    client, tok = served.client(), served.engine.tokenizer
    r = chat(client, logprobs=True, seed=1)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == BASE
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    templated = tok.apply_chat_template(ask("Tell me a story."), tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok(templated, add_special_tokens=False)["input_ids"])
    assert r.usage.completion_tokens == len(choice.logprobs.content) <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    assert r.system_fingerprint and r.system_fingerprint.startswith("fp_")
    again = chat(client, "alpha", max_tokens=2)
    assert again.system_fingerprint == r.system_fingerprint == served.engine.system_fingerprint


def test_max_tokens_reached_finishes_with_length(served):
    r = chat(served.client(), max_tokens=8, seed=3, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8


def test_stop_sequence_finishes_with_stop_and_is_cut_off(served):
    client = served.client()
    full = chat(client, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
    at = next(i for i in range(len(full) // 2, len(full) - 2) if full[i:i + 3].strip() == full[i:i + 3])
    stop = full[at:at + 3]
    r = chat(client, max_tokens=16, temperature=0, stop=[stop, "never-seen-stop"], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[:full.find(stop)]
    assert stop not in r.choices[0].message.content


def test_n_gives_indexed_choices_and_choice_0_is_the_single_answer(served):
    client = served.client()
    r = chat(client, n=3, seed=7, temperature=1.0, logprobs=True)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    # the seed contract: a choice depends on (seed, choice index), not on n
    single = chat(client, seed=7, temperature=1.0)
    assert single.choices[0].message.content == r.choices[0].message.content


def test_logprobs_and_top_logprobs_shape(served):
    r = chat(served.client(), temperature=0, logprobs=True, top_logprobs=3, max_tokens=8)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens > 0
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content)
    for t in content:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 3
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # greedy: the chosen token is the most likely one
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)


def test_seed_makes_sampling_reproducible(served):
    client = served.client()
    kw = {"temperature": 1.0, "max_tokens": 16, "logprobs": True}
    a, b = chat(client, seed=1234, **kw), chat(client, seed=1234, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert [t.logprob for t in a.choices[0].logprobs.content] == [t.logprob for t in b.choices[0].logprobs.content]
    c = chat(client, seed=4321, **kw)
    assert c.choices[0].message.content != a.choices[0].message.content


def test_each_adapter_changes_the_output(served):
    client = served.client()
    outs = {m: chat(client, m, temperature=0, max_tokens=10).choices[0].message.content for m in [BASE, *ADAPTERS]}
    assert len(set(outs.values())) == 4, outs


# -- streaming -----------------------------------------------------------------------------------------
def test_stream_concatenates_to_the_non_streamed_result(served):
    client = served.client()
    kw = {"model": "beta", "messages": ask("Tell me a story."), "max_tokens": 12, "seed": 11, "n": 2}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))

    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.system_fingerprint for c in chunks} == {whole.system_fingerprint}
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == choice.index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        assert mine[-1].finish_reason == choice.finish_reason == "length"


ORDER_TOOLS = [
    {"type": "function", "function": {"name": "order_status", "description": "Where an order is", "parameters": {
        "type": "object", "properties": {"order_id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3,4}$"}},
        "required": ["order_id"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "request_refund", "parameters": {
        "type": "object", "properties": {"order_id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3,4}$"},
                                         "reason": {"type": "string", "enum": ["damaged", "late", "wrong_item"]}},
        "required": ["order_id", "reason"], "additionalProperties": False}}}]


def _streamed_calls(chunks, index: int) -> tuple[str, list[tuple[str, str]], str | None]:
    """A choice's content, its calls (name, arguments) assembled from tool_calls deltas, and its finish_reason."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for c in chunk.choices:
            if c.index != index:
                continue
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                if d.id is not None:
                    assert d.index not in calls and d.type == "function" and d.id.startswith("call_")
                    calls[d.index] = [d.function.name, ""]
                calls[d.index][1] += d.function.arguments or ""
            finish = c.finish_reason or finish
    return content, [tuple(v) for _, v in sorted(calls.items())], finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "request_refund"}}])
def test_forced_tool_calls_stream_as_openai_deltas_and_equal_the_whole_answer(served, choice):
    client = served.client()
    kw = {"model": BASE, "messages": ask("My order PX-204 came broken, I want my money back."), "tools": ORDER_TOOLS,
          "tool_choice": choice, "parallel_tool_calls": False, "max_tokens": 80, "n": 2, "seed": 3, "temperature": 0.8}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    for c in whole.choices:
        assert c.message.content is None and c.message.tool_calls, c.message
        names = {t["function"]["name"] for t in ORDER_TOOLS}
        for call in c.message.tool_calls:  # the grammar: a declared function, arguments valid by its schema
            args = json.loads(call.function.arguments)
            assert call.function.name in names and call.type == "function"
            assert set(args) <= {"order_id", "reason"} and re.fullmatch(r"[A-Z]{2}-[0-9]{3,4}", args["order_id"])
        if choice != "required":
            assert [t.function.name for t in c.message.tool_calls] == ["request_refund"]
        assert c.finish_reason == ("tool_calls" if choice == "required" else "stop")
        content, calls, finish = _streamed_calls(chunks, c.index)
        assert content == "" and finish == c.finish_reason
        assert [(n, json.loads(a)) for n, a in calls] == [(t.function.name, json.loads(t.function.arguments))
                                                          for t in c.message.tool_calls]


def test_a_tool_conversation_round_trips_through_the_openai_client(served):
    """The client's own assistant message (with tool_calls) and a tool result go back in the history."""
    client = served.client()
    messages = ask("Where is order PX-204?")
    first = client.chat.completions.create(model=BASE, messages=messages, tools=ORDER_TOOLS, max_tokens=60,
                                           tool_choice={"type": "function", "function": {"name": "order_status"}})
    call = first.choices[0].message.tool_calls[0]
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"status": "shipped"}'}]
    second = client.chat.completions.create(model=BASE, messages=messages, tools=ORDER_TOOLS, tool_choice="none",
                                            max_tokens=8)
    assert second.choices[0].message.tool_calls is None and second.choices[0].finish_reason in ("stop", "length")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


def test_stream_sends_each_choice_finish_reason_once(served):
    kw = {"model": "beta", "messages": ask("Tell me a story."), "max_tokens": 12, "seed": 11, "n": 2}
    chunks = list(served.client().chat.completions.create(**kw, stream=True))
    for index in (0, 1):
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].index == index]
        assert reasons[-1] == "length" and reasons.count("length") == 1, reasons


def test_stream_with_stop_string_matches_non_streamed(served):
    client = served.client()
    kw = {"model": "gamma", "messages": ask("Once upon a time"), "max_tokens": 16, "seed": 5, "stop": [" the", "."]}
    whole = client.chat.completions.create(**kw).choices[0]
    streamed = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole.message.content
    assert streamed[-1].choices[0].finish_reason == whole.finish_reason


def test_raw_sse_ends_with_done(served):
    body = {"model": BASE, "messages": ask("Hi"), "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and len(data) >= 2
    for d in data[:-1]:
        assert json.loads(d)["object"] == "chat.completion.chunk"


# -- batch invariance ----------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["served", "served_bf16"], ids=["fp32", "bf16"])
def test_concurrent_seeded_requests_equal_each_run_alone(which, request):
    server: Served = request.getfixturevalue(which)
    jobs = [(model, prompt, 100 + k) for k, (model, prompt) in
            enumerate((m, p) for p in PROMPTS for m in [BASE, *ADAPTERS])]

    async def together():
        async with server.async_client() as client:
            return await asyncio.gather(*(client.chat.completions.create(
                model=m, messages=ask(p, SYSTEM), max_tokens=8, seed=s, temperature=1.0) for m, p, s in jobs))

    concurrent = [r.choices[0].message.content for r in asyncio.run(together())]
    client = server.client()
    alone = [client.chat.completions.create(model=m, messages=ask(p, SYSTEM), max_tokens=8, seed=s,
                                            temperature=1.0).choices[0].message.content for m, p, s in jobs]
    assert concurrent == alone
    assert len(set(alone)) > 8  # the requests really differ


# -- /v1/completions -----------------------------------------------------------------------------------
def test_completion_with_a_string_prompt(served):
    prompt = "The old ship sailed"
    r = served.client().completions.create(model=BASE, prompt=prompt, max_tokens=8, seed=2)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.system_fingerprint
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.choices[0].text
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(served.engine.encode(prompt))
    assert 0 < r.usage.completion_tokens <= 8


def test_completion_list_of_prompts_indexes_choices_by_prompt_then_n(served):
    client = served.client()
    prompts = ["The old ship sailed", "In the morning the captain"]
    both = client.completions.create(model="alpha", prompt=prompts, n=2, max_tokens=6, seed=9)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    for pi, prompt in enumerate(prompts):
        one = client.completions.create(model="alpha", prompt=prompt, n=2, max_tokens=6, seed=9)
        assert [c.text for c in one.choices] == [c.text for c in both.choices[pi * 2:pi * 2 + 2]]


def test_completion_token_id_prompt_equals_the_string_prompt(served):
    client, prompt = served.client(), "The old ship sailed"
    ids = served.engine.encode(prompt)
    by_text = client.completions.create(model="gamma", prompt=prompt, max_tokens=6, seed=4)
    by_ids = client.completions.create(model="gamma", prompt=ids, max_tokens=6, seed=4)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage == by_text.usage


@pytest.mark.parametrize("model", [BASE, "alpha"])
def test_echo_gives_prompt_logprobs_equal_to_score_continuations(served, scorer, model):
    text = "The cat sat on the mat and looked at the sea."
    r = served.client().completions.create(model=model, prompt=text, echo=True, logprobs=1, max_tokens=0)
    ids = served.engine.encode(text)
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text == text and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert text[offset:offset + len(token)] == token
    for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert isinstance(top, dict) and len(top) == 1 and value <= max(top.values()) + 1e-6

    ref = scorer.score_continuations([(ids[:1], ids[1:])], adapter=None if model == BASE else model)[0]
    assert lp.token_logprobs[1:] == pytest.approx(ref.token_logprobs, abs=1e-5)


def test_echo_prompt_logprobs_match_a_plain_hf_forward(served):
    import torch

    from budwood.models.load import load_base

    text = "Far away, on a small island, the crew found an old map."
    r = served.client().completions.create(model=BASE, prompt=text, echo=True, logprobs=0, max_tokens=0)
    ids = served.engine.encode(text)
    model = load_base(BASE, dtype=torch.float32).model
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)


def test_lm_eval_local_completions_loglikelihood_request(served, scorer):
    """The payload lm-evaluation-harness's `local-completions` sends for loglikelihood, parsed its way."""
    pairs = [("The captain looked at the", " sea and smiled."), ("The captain looked at the", " map.")]
    tokens = [(served.engine.encode(c), served.engine.encode(c + x)[len(served.engine.encode(c)):]) for c, x in pairs]
    payload = {"model": BASE, "prompt": [c + x for c, x in tokens], "temperature": 0, "max_tokens": 1,
               "logprobs": 1, "seed": 1234, "echo": True}
    r = httpx.post(f"{served.url}/v1/completions", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    parsed = []
    for choice, (ctx, _) in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), tokens):
        token_lps = choice["logprobs"]["token_logprobs"][len(ctx):-1]
        tops = choice["logprobs"]["top_logprobs"][len(ctx):-1]
        parsed.append((sum(token_lps), all(t == max(top.values()) for t, top in zip(token_lps, tops))))
    for (logprob, greedy), ref in zip(parsed, scorer.score_continuations(tokens)):
        assert logprob == pytest.approx(ref.logprob, abs=1e-5) and greedy == ref.is_greedy


# -- structured output ---------------------------------------------------------------------------------
grammar_available = pytest.mark.skipif(importlib.util.find_spec("budwood.engine.grammar") is None,
                                       reason="budwood.engine.grammar is not there yet")
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["color", "count"], "additionalProperties": False}


@grammar_available
def test_response_format_json_object_gives_json(served):
    # free text inside JSON strings has no bound, so a choice may run out of tokens; those that stop must parse
    r = chat(served.client(), n=4, max_tokens=64, seed=0, response_format={"type": "json_object"})
    stopped = [c.message.content for c in r.choices if c.finish_reason == "stop"]
    assert stopped and all(c.message.content.lstrip().startswith("{") for c in r.choices)
    for content in stopped:
        assert isinstance(json.loads(content), dict)


@grammar_available
@pytest.mark.parametrize("model", [BASE, "gamma"])
def test_response_format_json_schema_is_followed(served, model):
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}}
    # 160 tokens cover the longest value the grammar allows here (whitespace between tokens is bounded)
    r = chat(served.client(), model, "Pick a color.", max_tokens=160, seed=1, response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"color", "count"} and value["color"] in ("red", "green", "blue")
    if importlib.util.find_spec("jsonschema") is not None:
        import jsonschema

        jsonschema.validate(value, SCHEMA)


# -- errors --------------------------------------------------------------------------------------------
CHAT_OK = {"model": BASE, "messages": ask("Hi"), "max_tokens": 2}


@pytest.mark.parametrize(("route", "body", "status", "param", "code"), [
    ("chat", {**CHAT_OK, "model": "no-such-adapter"}, 404, "model", "model_not_found"),
    ("chat", {"model": BASE, "max_tokens": 2}, 400, "messages", None),
    ("chat", {**CHAT_OK, "messages": []}, 400, "messages", None),
    ("chat", {**CHAT_OK, "temperature": "hot"}, 400, "temperature", None),
    ("chat", {**CHAT_OK, "temperature": 5}, 400, "temperature", None),
    ("chat", {**CHAT_OK, "max_tokens": 5000}, 400, "max_tokens", None),
    ("chat", {**CHAT_OK, "max_tokens": 5000, "stream": True}, 400, "max_tokens", None),
    ("chat", {**CHAT_OK, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("chat", {**CHAT_OK, "tools": [{"type": "function", "function": {"name": "no spaces"}}]}, 400, "tools",
     "invalid_tool"),
    ("chat", {**CHAT_OK, "response_format": {"type": "xml"}}, 400, "response_format", None),
    ("chat", {**CHAT_OK, "messages": [{"role": "wizard", "content": "hi"}]}, 400, None, None),
    ("completions", {"model": "no-such-adapter", "prompt": "x"}, 404, "model", "model_not_found"),
    ("completions", {"model": BASE, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    ("completions", {"model": BASE, "prompt": [99999]}, 400, "prompt", None),
    ("completions", {"model": BASE, "prompt": []}, 400, "prompt", None),
    ("completions", {"model": BASE, "prompt": "x", "suffix": "y"}, 400, "suffix", None),
    ("completions", {"model": BASE, "prompt": "x", "best_of": 2}, 400, "best_of", None),
], ids=["unknown-model", "missing-messages", "empty-messages", "temperature-type", "temperature-range",
        "beyond-context", "beyond-context-stream", "top-logprobs-alone", "tools", "response-format",
        "unknown-role", "completions-unknown-model", "completions-max-tokens-0", "completions-token-out-of-vocab",
        "completions-empty-prompt", "completions-suffix", "completions-best-of"])
def test_bad_requests_get_openai_errors(served, route, body, status, param, code):
    r = httpx.post(f"{served.url}/v1/{route}" + ("/completions" if route == "chat" else ""), json=body, timeout=60)
    assert_error(r, status, param, code)


def test_invalid_json_body_is_400(served):
    r = httpx.post(f"{served.url}/v1/chat/completions", content=b'{"model": "budwood-tiny", "messages": [',
                   headers={"content-type": "application/json"})
    assert "JSON" in assert_error(r, 400)["message"]


@pytest.mark.parametrize("token_id", ["99999", "-1"])
def test_logit_bias_outside_the_vocabulary_is_400(served, token_id):
    r = httpx.post(f"{served.url}/v1/chat/completions", json={**CHAT_OK, "logit_bias": {token_id: 5}}, timeout=60)
    # uvicorn logs a 500's traceback after sending it; Python 3.11's traceback and pytest's report both call
    # ast.parse, which is not thread-safe there (SystemError: AST constructor recursion depth mismatch)
    time.sleep(0.5)
    assert_error(r, 400, "logit_bias")


def test_the_openai_client_raises_typed_errors(served):
    client = served.client()
    with pytest.raises(openai.NotFoundError) as nf:
        chat(client, "no-such-adapter")
    assert nf.value.code == "model_not_found" and nf.value.param == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        chat(client, temperature=5)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as long:
        chat(client, max_tokens=5000, stream=True)
    assert "context length" in long.value.message
    assert chat(client, max_tokens=2).choices[0].message.content is not None  # still serving


# -- API key -------------------------------------------------------------------------------------------
def test_api_key_is_required_on_v1_routes_but_not_on_health(guarded):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}):
        r = httpx.post(f"{guarded.url}/v1/chat/completions", json=CHAT_OK, headers=headers)
        assert_error(r, 401, code="invalid_api_key")
    assert_error(httpx.get(f"{guarded.url}/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        chat(guarded.client("wrong-key"), max_tokens=2)

    good = guarded.client(API_KEY)
    assert chat(good, max_tokens=2).choices[0].message.content is not None
    assert [m.id for m in good.models.list()] == [BASE]
    assert httpx.get(f"{guarded.url}/health").json()["status"] == "ok"


# -- bounded queue -------------------------------------------------------------------------------------
def test_a_full_queue_answers_429_and_the_admitted_requests_finish(guarded):
    async def one(client: openai.AsyncOpenAI, stream: bool) -> str:
        r = await client.chat.completions.create(model=BASE, messages=ask("Tell me a story."), max_tokens=24,
                                                 seed=1, stream=stream, extra_body={"ignore_eos": True})
        if stream:
            return "".join([c.choices[0].delta.content or "" async for c in r if c.choices])
        return r.choices[0].message.content

    async def burst():
        async with guarded.async_client(API_KEY) as client:
            return await asyncio.gather(*(one(client, i % 2 == 1) for i in range(6)), return_exceptions=True)

    results = asyncio.run(burst())
    refused = [r for r in results if isinstance(r, Exception)]
    done = [r for r in results if isinstance(r, str)]
    assert all(isinstance(e, openai.RateLimitError) for e in refused), refused
    assert refused and len(done) >= 2
    assert refused[0].code == "rate_limit_exceeded"
    assert len(set(done)) == 1  # same seed, same answer, streamed or not
    assert idle_within(guarded.url, 10), busy(guarded.url)
    assert chat(guarded.client(API_KEY), max_tokens=2).choices  # serving again


# -- client disconnect ---------------------------------------------------------------------------------
def test_closing_a_stream_cancels_its_generation(served):
    client, before = served.client(), scrape(served.url)
    stream = client.chat.completions.create(model="alpha", messages=ask("Tell me a long story."), max_tokens=1500,
                                            stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it)
    assert httpx.get(f"{served.url}/health").json()["in_flight"] == 1
    stream.close()
    assert idle_within(served.url, 10), busy(served.url)
    tokens = "budwood_generation_tokens_total"
    assert sample(scrape(served.url), tokens, model="alpha") == sample(before, tokens, model="alpha")  # aborted


def test_a_non_streamed_client_that_gives_up_cancels_its_generation(served):
    before = scrape(served.url)
    body = {"model": BASE, "messages": ask("Tell me a long story."), "max_tokens": 120, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    assert idle_within(served.url, 60), busy(served.url)  # an uncancelled generation runs out meanwhile
    after = scrape(served.url)
    outcome = {status: sample(after, "budwood_requests_total", model=BASE, route="chat", status=status)
               - sample(before, "budwood_requests_total", model=BASE, route="chat", status=status)
               for status in ("ok", "error")}
    assert outcome == {"ok": 0, "error": 1}  # aborted (499), not run to the end


# -- /metrics ------------------------------------------------------------------------------------------
def test_metrics_count_requests_tokens_and_latency(served):
    before = scrape(served.url)
    r = chat(served.client(), "gamma", max_tokens=6, seed=3)
    streamed = list(chat(served.client(), "gamma", max_tokens=3, stream=True, stream_options={"include_usage": True}))
    after = scrape(served.url)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("budwood_requests_total", model="gamma", route="chat", status="ok") == 2
    assert delta("budwood_prompt_tokens_total", model="gamma") == 2 * r.usage.prompt_tokens
    generated = r.usage.completion_tokens + streamed[-1].usage.completion_tokens
    assert delta("budwood_generation_tokens_total", model="gamma") == generated
    assert delta("budwood_request_latency_seconds_count", route="chat") == 2
    assert delta("budwood_request_latency_seconds_bucket", route="chat", le="+Inf") == 2
    assert sum(1 for name, _ in after if name == "budwood_request_latency_seconds_bucket") >= 14
    assert delta("budwood_time_to_first_token_seconds_count") == 1
    assert ("budwood_requests_in_flight", ()) in after and ("budwood_kv_cache_free_blocks", ()) in after


# -- adapters at run time ------------------------------------------------------------------------------
def test_an_adapter_copied_into_the_folder_is_served_at_once(served):
    shutil.copytree(served.folder / "alpha", served.folder / "delta")
    client = served.client()
    assert client.models.retrieve("delta").model_extra["parent"] == BASE
    assert "delta" in {m.id for m in client.models.list()}
    same = [chat(client, m, temperature=0, max_tokens=8).choices[0].message.content for m in ("delta", "alpha")]
    assert same[0] == same[1]  # the same weights under another name


def test_an_adapter_removed_from_the_folder_is_no_longer_served(served):
    shutil.copytree(served.folder / "beta", served.folder / "epsilon")
    client = served.client()
    chat(client, "epsilon", max_tokens=2)
    shutil.rmtree(served.folder / "epsilon")
    assert "epsilon" not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        chat(client, "epsilon", max_tokens=2)


def test_load_and_unload_lora_adapter(served):
    client, url = served.client(), served.url
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "org/custom", "lora_path": "beta"})
    assert r.status_code == 200, r.text
    assert client.models.retrieve("org/custom").model_extra["parent"] == BASE
    same = [chat(client, m, temperature=0, max_tokens=8).choices[0].message.content for m in ("org/custom", "beta")]
    assert same[0] == same[1]

    absolute = httpx.post(f"{url}/v1/load_lora_adapter",
                          json={"lora_name": "custom2", "lora_path": str(served.folder / "gamma")})
    assert absolute.status_code == 200, absolute.text

    for name in ("org/custom", "custom2"):
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
        with pytest.raises(openai.NotFoundError):
            chat(client, name, max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(name)
    assert_error(httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "custom2"}), 404)


@pytest.mark.parametrize("lora_path", ["../outside", "{outside}", "alpha/../../outside"])
def test_load_lora_adapter_refuses_paths_outside_the_folder(served, lora_path):
    outside = served.folder.parent / "outside"
    if not outside.exists():
        shutil.copytree(served.folder / "alpha", outside)
    r = httpx.post(f"{served.url}/v1/load_lora_adapter",
                   json={"lora_name": "escapee", "lora_path": lora_path.format(outside=outside)})
    assert "outside the adapters folder" in assert_error(r, 400, "lora_path")["message"]
    with pytest.raises(openai.NotFoundError):
        served.client().models.retrieve("escapee")


def test_load_lora_adapter_refuses_the_base_name(served):
    r = httpx.post(f"{served.url}/v1/load_lora_adapter", json={"lora_name": BASE, "lora_path": "alpha"})
    assert_error(r, 400, "lora_name")


def _bin_weights(d: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(d / "adapter_model.safetensors")), d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()


def _corrupt_config(d: Path) -> None:
    (d / "adapter_config.json").write_text('{"r": 8, "lora_alpha": ')


def _other_rank(d: Path) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))


def _other_base_shapes(d: Path) -> None:
    import torch
    from safetensors.torch import save_file

    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(8, 512), f"{prefix}.lora_B.weight": torch.zeros(512, 8)},
              str(d / "adapter_model.safetensors"))


def _other_base_fingerprint(d: Path) -> None:
    (d / "budwood.json").write_text(json.dumps({"base_model": {"fingerprint": "0" * 64}}))


@pytest.mark.parametrize(("spoil", "says"), [
    (_bin_weights, "only safetensors weights are loaded"),
    (_corrupt_config, "not valid JSON"),
    (_other_rank, "do not fit the base"),
    (_other_base_shapes, "do not fit the base"),
    (_other_base_fingerprint, "trained on another base model"),
], ids=["bin-weights", "corrupt-config", "other-rank", "other-base-shapes", "other-base-fingerprint"])
def test_invalid_adapters_are_refused_and_the_server_keeps_serving(served, spoil, says):
    name = "bad" + spoil.__name__.replace("_", "-")
    shutil.copytree(served.folder / "alpha", served.folder / name)
    spoil(served.folder / name)
    client = served.client()

    r = httpx.post(f"{served.url}/v1/chat/completions", json={**CHAT_OK, "model": name}, timeout=60)
    assert says in assert_error(r, 400, "model", "invalid_adapter")["message"]
    r = httpx.post(f"{served.url}/v1/load_lora_adapter", json={"lora_name": f"{name}-2", "lora_path": name})
    assert says in assert_error(r, 400, "lora_path", "invalid_adapter")["message"]
    with pytest.raises(openai.NotFoundError):
        chat(client, f"{name}-2", max_tokens=2)
    assert chat(client, "alpha", max_tokens=2).choices[0].message.content is not None
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"
