"""vLLM's /tokenize, /detokenize and /version on budwood serve: counts that equal what the chat and completion
routes charge, round trips, and refusals by name."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from budwood import __version__
from budwood.engine import Engine, EngineConfig
from budwood.serve import create_app

BASE = "budwood-tiny"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is order CW-4909?"}]
TOOLS = [{"type": "function", "function": {"name": "order_status", "parameters": {
    "type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}]


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(precision="fp32", max_batch_tokens=128))


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine=engine)) as c:
        yield c


def test_tokenize_a_prompt_as_vllm_answers(client, engine):
    r = client.post("/tokenize", json={"model": BASE, "prompt": "Once upon a time", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == engine.encode("Once upon a time", add_special_tokens=True)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == engine.runner.max_model_len
    assert body["token_strs"] == engine.tokenizer.convert_ids_to_tokens(body["tokens"])
    plain = client.post("/tokenize", json={"model": BASE, "prompt": "Once upon a time", "add_special_tokens": False})
    assert plain.json()["tokens"] == engine.encode("Once upon a time")
    assert client.post("/detokenize", json={"model": BASE, "tokens": plain.json()["tokens"]}).json() == \
        {"prompt": "Once upon a time"}
    # without a model, the base (vLLM's default; lm-evaluation-harness sends none)
    assert client.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"] == body["tokens"]
    assert client.post("/detokenize", json={"tokens": plain.json()["tokens"]}).json() == {"prompt": "Once upon a time"}


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_tokenize_messages_counts_what_the_chat_route_charges(client, tools):
    extra = {"tools": tools} if tools else {}
    counted = client.post("/tokenize", json={"model": BASE, "messages": MESSAGES, **extra}).json()["count"]
    charged = client.post("/v1/chat/completions", json={"model": BASE, "messages": MESSAGES, "max_tokens": 1,
                                                          **extra}).json()["usage"]["prompt_tokens"]
    assert counted == charged


@pytest.mark.parametrize("route, body, param", [
    ("/tokenize", {"model": BASE}, "prompt"),
    ("/tokenize", {"model": BASE, "prompt": "x", "messages": MESSAGES}, "messages"),
    ("/tokenize", {"model": BASE, "prompt": "x", "truncate_prompt_tokens": 3}, "truncate_prompt_tokens"),
    ("/tokenize", {"model": BASE, "messages": MESSAGES, "add_special_tokens": True}, "add_special_tokens"),
    ("/tokenize", {"model": BASE, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
    ("/detokenize", {"model": BASE, "tokens": [1, 10 ** 6]}, "tokens"),
    ("/detokenize", {"model": BASE, "tokens": [-1]}, "tokens"),
])
def test_bad_requests_are_refused_by_name(client, route, body, param):
    r = client.post(route, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_an_unknown_model_is_404_and_version_answers(client):
    r = client.post("/tokenize", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.get("/version").json() == {"version": __version__}


def test_a_keyed_server_needs_the_key_for_tokenize(engine):
    with TestClient(create_app(engine=engine, api_key="k")) as c:
        assert c.post("/tokenize", json={"model": BASE, "prompt": "x"}).status_code == 401
        assert c.post("/detokenize", json={"model": BASE, "tokens": [5]}).status_code == 401
        ok = c.post("/tokenize", json={"model": BASE, "prompt": "x"}, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200
