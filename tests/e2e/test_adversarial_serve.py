"""`budwood serve` under attack: the probes of issue 17 against a live server on budwood-tiny, each answered
with a 4xx naming what was wrong while the server keeps serving, and property tests of the request
models (random JSON never gets a 500 or a hang). The limits are serve/limits.py's (docs/serving.md)."""
from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import running
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import BASE, ask, assert_error

from budwood.engine import Engine, EngineConfig
from budwood.serve.app import create_app
from budwood.serve.limits import ServeLimits
from budwood.serve.protocol import ChatCompletionRequest, CompletionRequest

LIMITS = ServeLimits(max_body_bytes=1 << 20, max_prompt_tokens=1000, template_max_steps=200_000)
BOMB = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}never"


@dataclass
class Target:
    url: str
    engine: Engine
    folder: Path

    def post(self, route: str, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}{route}", timeout=120, **kw)

    def healthy(self) -> bool:
        return httpx.get(f"{self.url}/health", timeout=30).status_code == 200


@pytest.fixture(scope="module")
def target(tiny_adapters, tmp_path_factory) -> Iterator[Target]:
    folder = tmp_path_factory.mktemp("adversarial") / "adapters"
    shutil.copytree(tiny_adapters, folder)
    shutil.copytree(folder / "alpha", folder / "bomb")
    (folder / "bomb" / "chat_template.jinja").write_text(BOMB)
    engine = Engine(EngineConfig(precision="fp32", adapters=str(folder), kv_cache_tokens=8192))
    with running(create_app(engine=engine, limits=LIMITS)) as url:
        yield Target(url, engine, folder)


def chat_body(**fields) -> dict:
    return {"model": BASE, "messages": ask("Tell me a story."), "max_tokens": 2, **fields}


def test_a_body_over_the_limit_is_413_and_the_server_keeps_serving(target):
    r = target.post("/v1/chat/completions", content=b'{"model": "' + b"x" * (2 << 20) + b'"}',
                    headers={"content-type": "application/json"})
    err = assert_error(r, 413, code="request_too_large")
    assert "max_body_bytes" in err["message"]
    assert target.healthy()


def test_health_answers_while_a_large_prompt_is_being_tokenised(target, monkeypatch):
    """The tokenising is held until /health has answered: were it on the event loop, /health would wait."""
    entered, release = threading.Event(), threading.Event()
    chat_prompt = target.engine.chat_prompt

    def held(*args, **kw):
        entered.set()
        release.wait(60)
        return chat_prompt(*args, **kw)

    monkeypatch.setattr(target.engine, "chat_prompt", held)

    async def race() -> list[str]:
        order: list[str] = []
        async with httpx.AsyncClient(base_url=target.url, timeout=120) as client:
            async def big():
                r = await client.post("/v1/chat/completions", json=chat_body(messages=ask("word " * 100_000)))
                order.append(f"chat {r.status_code}")

            task = asyncio.create_task(big())
            try:
                await asyncio.to_thread(entered.wait, 60)
                r = await client.get("/health", timeout=30)
                order.append(f"health {r.status_code}")
            finally:
                release.set()
            await task
        return order

    assert asyncio.run(race()) == ["health 200", "chat 400"]  # 100,000 words: over max_prompt_tokens


def test_twenty_thousand_stop_strings_are_refused_naming_stop(target):
    stops = [f"stop string {i} " * 2 for i in range(20_000)]  # 0.7 MB, under the body limit
    err = assert_error(target.post("/v1/chat/completions", json=chat_body(stop=stops)), 400, "stop",
                       "limit_exceeded")
    assert "max_stop" in err["message"]
    assert_error(target.post("/v1/completions", json={"model": BASE, "prompt": "x", "stop": ["y" * 300]}), 400,
                 "stop", "limit_exceeded")


@pytest.mark.parametrize("route, fields, param", [
    ("/v1/chat/completions", {"n": 129}, "n"),  # OpenAI's own bound, from the request model
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": ask("x") * 2049}, "messages"),
    ("/v1/chat/completions", {"messages": ask("x" * 1_000_001)}, "messages"),
    ("/v1/chat/completions", {"messages": ask("word " * 2000)}, "messages"),  # over max_prompt_tokens
    ("/v1/chat/completions", {"stop_token_ids": list(range(65))}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "best_of": 21}, "best_of"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": ["x"] * 2049}, "prompt"),
    ("/v1/completions", {"prompt": [1] * 1001}, "prompt"),  # over max_prompt_tokens, as token ids
])
def test_requests_over_a_limit_are_400_naming_the_field(target, route, fields, param):
    body = chat_body(**fields) if route.endswith("chat/completions") else {"model": BASE, "max_tokens": 2, **fields}
    assert_error(target.post(route, json=body), 400, param)


def test_a_body_of_45000_nested_brackets_is_400_not_a_recursion_error(target):
    r = target.post("/v1/chat/completions", content=b"[" * 45_000 + b"]" * 45_000,
                    headers={"content-type": "application/json"})
    assert "max_json_depth" in assert_error(r, 400, "body")["message"]
    assert target.healthy()


@pytest.mark.parametrize("lora_path", ["alpha\x00", "\x00/etc/passwd"])
def test_a_nul_byte_in_lora_path_is_400(target, lora_path):
    r = target.post("/v1/load_lora_adapter", json={"lora_name": "nul", "lora_path": lora_path})
    assert_error(r, 400, "lora_path")


def test_a_template_bomb_is_refused_naming_the_template_and_the_server_keeps_serving(target):
    err = assert_error(target.post("/v1/chat/completions", json=chat_body(model="bomb")), 400, "messages",
                       "chat_template_limit")
    assert "adapter 'bomb'" in err["message"] and "template_max_steps" in err["message"]
    ok = target.post("/v1/chat/completions", json=chat_body(model="alpha"))
    assert ok.status_code == 200, ok.text


def test_an_edited_chat_template_is_used_by_the_next_request(target):
    shutil.copytree(target.folder / "alpha", target.folder / "templated")
    template = target.folder / "templated" / "chat_template.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")

    def prompt_tokens() -> int:
        r = target.post("/v1/chat/completions", json=chat_body(model="templated"))
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    before = prompt_tokens()
    template.write_text("You are a pirate who answers in rhymes. {% for m in messages %}{{ m.content }}{% endfor %}")
    assert prompt_tokens() > before


def test_request_models_take_random_json_without_crashing():
    """Pydantic either accepts a body or says what is wrong with it; nothing else escapes."""
    from pydantic import ValidationError

    @settings(max_examples=300, deadline=None)
    @given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                      max_size=5), max_leaves=30))
    def check(value):
        for model in (ChatCompletionRequest, CompletionRequest):
            try:
                model.model_validate(value)
            except ValidationError:
                pass

    check()


_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=False), st.text(max_size=8),
                   st.lists(st.text(max_size=4), max_size=6), st.lists(st.integers(-2, 40_000), max_size=6),
                   st.dictionaries(st.text(max_size=4), st.integers(-200, 200), max_size=3))
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "nobody"]),
                                  "content": st.one_of(st.text(max_size=40), st.none(), st.integers(),
                                                       st.lists(st.fixed_dictionaries(
                                                           {"type": st.sampled_from(["text", "image_url"]),
                                                            "text": st.text(max_size=8)}), max_size=2))})
_FIELDS = ["temperature", "top_p", "n", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "seed",
           "top_k", "min_p", "repetition_penalty", "stop_token_ids", "logprobs", "top_logprobs", "echo", "best_of",
           "response_format", "stream", "suffix", "calibrated_abstention", "add_generation_prompt", "prompt"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
       model=st.sampled_from([BASE, "alpha", "no-such-model", "../alpha", "alpha\x00"]),
       messages=st.lists(_MESSAGE, max_size=3), extra=st.dictionaries(st.sampled_from(_FIELDS), _VALUE, max_size=4),
       max_tokens=st.integers(-1, 3))
def test_random_requests_never_get_a_500_or_hang(target, route, model, messages, extra, max_tokens):
    body = {"model": model, "max_tokens": max_tokens, **extra}
    body["messages" if route.endswith("chat/completions") else "prompt"] = (
        messages if route.endswith("chat/completions") else extra.get("prompt", "Once upon a time"))
    r = target.post(route, json=body)  # a hang fails on the client's 120 s timeout
    assert r.status_code in (200, 400, 404, 413), (r.status_code, r.text[:500])
    if r.status_code != 200:
        assert_error(r, r.status_code)
