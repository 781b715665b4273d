"""ServeLimits, without a model: the body read under its size and depth limits at the ASGI level (so what
was read can be counted), the request checks, the `--limit` options, and a NUL in lora_path."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from budwood.errors import BudwoodError, ConfigError, ErrorKind
from budwood.serve import create_app
from budwood.serve.limits import ServeLimits, check_chat, check_completion, check_prompt_tokens
from budwood.serve.protocol import ChatCompletionRequest, CompletionRequest, LoadAdapterRequest
from budwood.serve.serving import OpenAIServing

CHUNK = 64 << 10


class NeverServes:
    """The serving object the lifespan would set; no request in these tests gets past the body limits."""

    async def create_chat_completion(self, body, caller, request):
        raise AssertionError("a refused body reached the route")


def call(app, headers: list[tuple[bytes, bytes]], chunks: int, chunk: bytes = b"[" * CHUNK) -> tuple[int, dict, int]:
    """POST /v1/chat/completions with a body sent in `chunks` chunks: (status, JSON answer, chunks read)."""
    read, sent = 0, []

    async def receive():
        nonlocal read
        if read >= chunks:
            return {"type": "http.disconnect"}
        read += 1
        return {"type": "http.request", "body": chunk, "more_body": read < chunks}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), read


@pytest.fixture
def app():
    app = create_app(limits=ServeLimits(max_body_bytes=4 * CHUNK))
    app.state.openai_serving = NeverServes()
    return app


def test_a_declared_content_length_over_the_limit_is_413_before_a_byte_is_read(app):
    status, body, read = call(app, [(b"content-length", str(100 << 20).encode())], chunks=1600)
    assert status == 413 and read == 0
    assert body["error"]["code"] == "request_too_large" and "max_body_bytes" in body["error"]["message"]


def test_a_streamed_body_over_the_limit_is_413_without_reading_the_rest(app):
    status, body, read = call(app, [], chunks=1600)  # 100 MiB offered in 64 KiB chunks, no Content-Length
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert read == 5  # the chunk that went over 256 KiB, and not one more


def test_a_body_nested_deeper_than_the_limit_is_400_before_it_is_parsed(app):
    status, body, _ = call(app, [], chunks=1, chunk=b"[" * 45_000 + b"]" * 45_000)
    assert status == 400 and body["error"]["param"] == "body" and "max_json_depth" in body["error"]["message"]


def test_a_body_within_the_limits_reaches_the_route(app):
    ok = json.dumps({"model": "m", "messages": [{"role": "user", "content": "[[[[ hi ]]]]" * 100}]}).encode()
    with pytest.raises(AssertionError, match="reached the route"):
        call(app, [(b"content-length", str(len(ok)).encode())], chunks=1, chunk=ok)


def chat_request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


def refused(check, *args) -> BudwoodError:
    with pytest.raises(BudwoodError) as e:
        check(*args)
    assert e.value.kind is ErrorKind.INVALID and e.value.code == "limit_exceeded"
    return e.value


@pytest.mark.parametrize("fields, param", [
    ({"stop": [f"stop {i} " * 20 for i in range(20_000)]}, "stop"),
    ({"stop": [chr(97 + i) for i in range(17)]}, "stop"),
    ({"stop": "x" * 257}, "stop"),
    ({"n": 128}, None),  # OpenAI's bound: allowed
    ({"logprobs": True, "top_logprobs": 20}, None),  # at the limit: allowed
    ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
])
def test_chat_requests_over_a_limit_are_refused_naming_the_field(fields, param):
    req = chat_request(**fields)
    messages = [{"role": "user", "content": "hi"}]
    if param is None:
        check_chat(ServeLimits(), req, messages)
    else:
        assert refused(check_chat, ServeLimits(), req, messages).param == param


def test_top_logprobs_and_logprobs_follow_max_logprobs():
    assert refused(check_chat, ServeLimits(max_logprobs=5), chat_request(logprobs=True, top_logprobs=6),
                   []).param == "top_logprobs"
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": 6})
    assert refused(check_completion, ServeLimits(max_logprobs=5), req).param == "logprobs"


def test_messages_and_characters_are_counted_before_tokenising():
    limits = ServeLimits(max_messages=3, max_prompt_chars=100)
    many = [{"role": "user", "content": "x"}] * 4
    assert "max_messages" in str(refused(check_chat, limits, chat_request(), many))
    long = [{"role": "system", "content": "x" * 60}, {"role": "user", "content": "y" * 41}]
    assert "max_prompt_chars" in str(refused(check_chat, limits, chat_request(), long))
    check_chat(limits, chat_request(), long[:1])


def test_completion_prompts_are_counted_and_measured():
    limits = ServeLimits(max_prompts=2, max_prompt_chars=10, max_best_of=4)
    many = CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b", "c"]})
    assert refused(check_completion, limits, many).param == "prompt"
    long = CompletionRequest.model_validate({"model": "m", "prompt": "x" * 11})
    assert "max_prompt_chars" in str(refused(check_completion, limits, long))
    best_of = CompletionRequest.model_validate({"model": "m", "prompt": "x", "best_of": 5})
    assert refused(check_completion, limits, best_of).param == "best_of"
    check_completion(limits, CompletionRequest.model_validate({"model": "m", "prompt": list(range(1000))}))


def test_prompt_tokens_are_limited_only_when_set():
    check_prompt_tokens(ServeLimits(), "prompt", [list(range(100_000))])
    assert refused(check_prompt_tokens, ServeLimits(max_prompt_tokens=8), "messages", [[1] * 9]).param == "messages"


def test_limit_options_set_a_limit_and_refuse_unknown_names_and_bad_values():
    limits = ServeLimits.from_options(["max_body_bytes=16777216", "max-stop=8", "max_prompt_tokens=none"])
    assert (limits.max_body_bytes, limits.max_stop, limits.max_prompt_tokens) == (16 << 20, 8, None)
    with pytest.raises(ConfigError, match="did you mean 'max_stop'"):
        ServeLimits.from_options(["max_stops=8"])
    with pytest.raises(ConfigError, match="max_logprobs"):
        ServeLimits.from_options(["max_logprobs=21"])  # OpenAI's own bound
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        ServeLimits.from_options(["max_stop"])


@pytest.mark.parametrize("lora_path", ["a\x00b", "\x00", "ok/../x\x00"])
def test_a_nul_in_lora_path_is_a_400_naming_it(tmp_path, lora_path):
    serving = SimpleNamespace(engine=SimpleNamespace(config=SimpleNamespace(adapters=str(tmp_path)), base_name="b"))
    with pytest.raises(BudwoodError) as e:
        asyncio.run(OpenAIServing.load_adapter(serving, LoadAdapterRequest(lora_name="x", lora_path=lora_path)))
    assert e.value.kind is ErrorKind.INVALID and e.value.param == "lora_path"


BOMB = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}never"


def test_a_template_of_nested_loops_is_stopped_by_its_step_budget_naming_it(tiny_tokenizer):
    import sys

    from budwood.engine import TemplateBudget, TemplateBudgetExceeded
    from budwood.engine.chat_template import bounded_rendering

    before = sys.gettrace()
    with pytest.raises(TemplateBudgetExceeded, match="adapter 'bomb'.*template_max_steps") as e:
        with bounded_rendering(TemplateBudget(max_steps=50_000), "the chat template of adapter 'bomb'"):
            tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=BOMB,
                                               tokenize=False)
    assert e.value.kind is ErrorKind.INVALID and e.value.param == "messages"
    assert sys.gettrace() is before  # the thread's tracer (coverage, a debugger) is back


def test_a_template_that_renders_too_much_is_stopped_by_its_size_budget(tiny_tokenizer):
    from budwood.engine import TemplateBudget, TemplateBudgetExceeded
    from budwood.engine.chat_template import bounded_rendering

    wide = "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
    with pytest.raises(TemplateBudgetExceeded, match="template_max_chars"):
        with bounded_rendering(TemplateBudget(max_chars=100_000), "t"):
            tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=wide,
                                               tokenize=False)


def test_an_ordinary_template_renders_the_same_within_the_budget(tiny_tokenizer):
    from budwood.engine import TemplateBudget
    from budwood.engine.chat_template import bounded_rendering

    messages = [{"role": "user", "content": f"question {i}"} for i in range(500)]
    plain = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with bounded_rendering(TemplateBudget(), "t"):
        bounded = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert bounded == plain


def test_editing_an_adapters_chat_template_reloads_it_on_next_use(tmp_path):
    import os

    from budwood.engine import AdapterCache, FolderResolver

    adapter = tmp_path / "a"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_text("{}")
    (adapter / "chat_template.jinja").write_text("{{ 'one' }}")
    loads = []
    cache = AdapterCache([FolderResolver(tmp_path)], lambda name, path: loads.append(
        (path / "chat_template.jinja").read_text()) or SimpleNamespace(path=path, stamp=file_stamp(path)))
    from budwood.engine.adapters import file_stamp

    cache.get("a")
    cache.get("a")
    stat = (adapter / "chat_template.jinja").stat()
    (adapter / "chat_template.jinja").write_text("{{ 'two' }}")  # same size, and its time put back (cp -p)
    os.utime(adapter / "chat_template.jinja", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cache.get("a")
    assert loads == ["{{ 'one' }}", "{{ 'two' }}"]
