"""lm-evaluation-harness against `budwood serve`: its `local-completions` and `local-chat-completions` models, with
their defaults, on tasks this file writes (local JSON data through lm_eval's own task YAML; nothing may leave the
machine: a guard refuses every connection but loopback).

The answers are checked, not just run: each log-likelihood lm_eval reports (echo + logprobs=1 + max_tokens=1, read
as token_logprobs[ctxlen:-1]) against a plain transformers forward of budwood-tiny, its accuracy against the
argmax of those, and each generated answer against transformers' greedy decoding of the same prompt.
"""
from __future__ import annotations

import json
import math
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import lm_eval  # the test extra: lm_eval[api] (its API models need tenacity)
import pytest
import requests
import torch
from conftest import running

from budwood.engine import EngineConfig
from budwood.models.names import TINY_DIR
from budwood.serve.app import create_app

BASE = "budwood-tiny"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
# (question, choices, gold): ten multiple-choice items, the right one first, then rotated so gold moves about
_MC = [("The sky on a clear day is", ["blue", "green", "loud"]),
       ("The captain of the ship looked at the", ["sea", "spoon", "seventeen"]),
       ("Two plus two is", ["four", "nine", "purple"]),
       ("The crew found an old", ["map", "sing", "quickly"]),
       ("Fish live in the", ["water", "oven", "sky"]),
       ("At night the moon", ["shines", "barks", "eats bread"]),
       ("The island was small and", ["green", "fast", "seventy"]),
       ("She opened the door and", ["walked in", "the the", "blue"]),
       ("Cats like to drink", ["milk", "rocks", "Tuesday"]),
       ("The storm broke the", ["mast", "silence of numbers", "happily"])]
MC = [(q, c[i % 3:] + c[:i % 3], -i % 3) for i, (q, c) in enumerate(_MC)]
QUESTIONS = ["Tell me about the island.", "Who was the captain?", "What did the crew find?", "Describe the storm.",
             "Where did the ship sail?"]
MATCHED = 3  # the generation tasks' gold answers: the reference's own for the first three, then one nothing gives
GEN_KWARGS = {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}


@pytest.fixture(scope="module")
def no_network() -> Iterator[None]:
    """lm_eval, datasets and transformers offline, and any connection but loopback refused outright."""
    def guard(address):
        if isinstance(address, tuple) and address[0] not in (*LOOPBACK, None):
            raise OSError(f"test_lm_eval: no network, but something connected to {address}")

    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        guard(address)
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        guard((host,))
        return real_getaddrinfo(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        yield


@pytest.fixture(scope="module")
def url(no_network) -> Iterator[str]:
    """`budwood serve --base budwood-tiny --precision fp32`'s app on a free loopback port."""
    with running(create_app(EngineConfig(precision="fp32"))) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def hf(no_network):
    """budwood-tiny as plain transformers sees it: the reference for scores and greedy answers."""
    from budwood.models.load import load_base

    base = load_base(BASE, dtype=torch.float32)
    base.model.eval()
    return base


def reference_loglikelihood(hf, context: str, continuation: str) -> tuple[float, bool]:
    """log P(continuation | context) and whether it is the greedy path, from one forward pass."""
    tok = hf.tokenizer
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    assert whole[:len(ctx)] == ctx and len(whole) > len(ctx), (context, continuation)
    with torch.no_grad():
        logp = torch.log_softmax(hf.model(torch.tensor([whole])).logits[0].float(), dim=-1)
    rows = range(len(ctx) - 1, len(whole) - 1)
    total = sum(logp[i, whole[i + 1]].item() for i in rows)
    return total, all(int(logp[i].argmax()) == whole[i + 1] for i in rows)


def reference_answer(hf, prompt_ids: list[int]) -> str:
    """Greedy decoding by transformers' generate, cut at GEN_KWARGS' stop string, as the server must answer."""
    with torch.no_grad():
        out = hf.model.generate(torch.tensor([prompt_ids]), max_new_tokens=GEN_KWARGS["max_gen_toks"],
                                do_sample=False, pad_token_id=hf.tokenizer.pad_token_id)
    text = hf.tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)
    return text.split(GEN_KWARGS["until"][0])[0]


def write_task(folder: Path, name: str, rows: list[dict], **config) -> None:
    """One lm_eval task: its YAML (dataset_path json: datasets' packaged loader, no hub) over a local JSONL file."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "hf-datasets")},
            "test_split": "test", **config}
    (folder / f"{name}.yaml").write_text(json.dumps(task, indent=1))  # JSON is YAML


def evaluate(folder: Path, task: str, model: str, **kwargs) -> dict:
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(folder), include_defaults=False)  # lm_eval's own thousands unindexed
    out = lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=tasks, **kwargs)
    assert out is not None
    return out


@pytest.mark.parametrize("extra", [{}, {"tokenized_requests": False}, {"batch_size": 4, "num_concurrent": 3}],
                         ids=["defaults", "text-prompts", "batched-concurrent"])
def test_local_completions_multiple_choice_scores_match_a_transformers_forward(url, hf, tmp_path, extra):
    """Defaults: one request per pair, the prompt as token ids; text prompts; several prompts per request (their
    choices told apart by index), three requests in flight."""
    write_task(tmp_path, "bw_mc", [{"question": q, "choices": c, "answer": a} for q, c, a in MC],
               output_type="multiple_choice", doc_to_text="{{question}}", doc_to_choice="{{choices}}",
               doc_to_target="answer", metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    out = evaluate(tmp_path, "bw_mc", "local-completions",
                   model_args={"model": BASE, "base_url": f"{url}/v1/completions", "tokenizer": str(TINY_DIR), **extra})

    results = out["results"]["bw_mc"]
    assert results["sample_len"] == len(MC)
    for metric in ("acc,none", "acc_norm,none"):
        assert math.isfinite(results[metric]) and 0 <= results[metric] <= 1, results
    samples = sorted(out["samples"]["bw_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(MC)
    right = 0
    for s, (question, choices, gold) in zip(samples, MC):
        assert [tuple(a) for a in s["arguments"]] == [(question, " " + c) for c in choices]
        served = [r[0] for r in s["resps"]]
        expected = [reference_loglikelihood(hf, question, " " + c) for c in choices]
        for (lp, greedy), (ref_lp, ref_greedy) in zip(served, expected):
            assert lp == pytest.approx(ref_lp, abs=1e-3) and greedy == ref_greedy, (question, served, expected)
        scores = [lp for lp, _ in expected]
        right += scores.index(max(scores)) == gold
    assert results["acc,none"] == pytest.approx(right / len(MC))


def test_local_chat_completions_generate_until_answers_are_transformers_greedy(url, hf, tmp_path):
    tok = hf.tokenizer
    refs = [reference_answer(hf, tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                         tokenize=True)["input_ids"]) for q in QUESTIONS]
    golds = refs[:MATCHED] + ["(no model says this)"] * (len(QUESTIONS) - MATCHED)
    write_task(tmp_path, "bw_chat", [{"question": q, "answer": g} for q, g in zip(QUESTIONS, golds)],
               output_type="generate_until", doc_to_text="{{question}}", doc_to_target="answer",
               generation_kwargs=GEN_KWARGS, metric_list=[{"metric": "exact_match"}])
    out = evaluate(tmp_path, "bw_chat", "local-chat-completions", apply_chat_template=True,
                   model_args={"model": BASE, "base_url": f"{url}/v1/chat/completions"})

    results = out["results"]["bw_chat"]
    assert results["sample_len"] == len(QUESTIONS)
    assert math.isfinite(results["exact_match,none"]) and results["exact_match,none"] == MATCHED / len(QUESTIONS)
    for s in sorted(out["samples"]["bw_chat"], key=lambda s: s["doc_id"]):
        sent = s["arguments"][0][0][0]  # (the messages as JSON text (lm_eval's JsonChatStr), gen_kwargs)
        assert json.loads(sent) == [{"role": "user", "content": QUESTIONS[s["doc_id"]]}]
        assert s["resps"] == [[refs[s["doc_id"]]]]


def test_local_completions_generate_until_answers_are_transformers_greedy(url, hf, tmp_path):
    """Generation through /v1/completions: the prompt as token ids, lm_eval's stop list with the EOS string added."""
    tok = hf.tokenizer
    refs = [reference_answer(hf, tok(q, add_special_tokens=False).input_ids) for q in QUESTIONS]
    golds = refs[:MATCHED] + ["(no model says this)"] * (len(QUESTIONS) - MATCHED)
    write_task(tmp_path, "bw_gen", [{"question": q, "answer": g} for q, g in zip(QUESTIONS, golds)],
               output_type="generate_until", doc_to_text="{{question}}", doc_to_target="answer",
               generation_kwargs=GEN_KWARGS, metric_list=[{"metric": "exact_match"}])
    out = evaluate(tmp_path, "bw_gen", "local-completions",
                   model_args={"model": BASE, "base_url": f"{url}/v1/completions", "tokenizer": str(TINY_DIR)})

    assert out["results"]["bw_gen"]["exact_match,none"] == MATCHED / len(QUESTIONS)
    for s in out["samples"]["bw_gen"]:
        assert s["resps"] == [[refs[s["doc_id"]]]]


def test_a_task_generation_kwarg_budwood_does_not_implement_is_refused_by_name(url):
    """lm_eval passes a task's generation_kwargs through as request fields: the payload it builds (its own
    `_create_payload`) with a field budwood does not implement is a 400 naming it, never an answer that ignored it."""
    from lm_eval.models.api_models import JsonChatStr
    from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

    completions = LocalCompletionsAPI(model=BASE, base_url=f"{url}/v1/completions", tokenizer=str(TINY_DIR))
    chat = LocalChatCompletion(model=BASE, base_url=f"{url}/v1/chat/completions")
    prompt_ids = completions.tok_encode("The captain looked at the")
    messages = [JsonChatStr(json.dumps([{"role": "user", "content": "Who was the captain?"}]))]  # as its tasks give it
    cases = [(completions, [prompt_ids], "typical_p", 0.9, "unsupported_parameter"),
             (completions, [prompt_ids], "min_tokens", 2, "unsupported_value"),
             (completions, [prompt_ids], "guided_choice", ["yes", "no"], "unsupported_parameter"),
             (chat, messages, "typical_p", 0.9, "unsupported_parameter")]
    for lm, prompt, field, value, code in cases:
        r = post_as_lm_eval(lm, prompt, {field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert r.json()["error"]["code"] == code and field in r.json()["error"]["message"], r.text
        assert post_as_lm_eval(lm, prompt, {}).status_code == 200  # the same request without it is answered


def post_as_lm_eval(lm, prompt, extra: dict) -> requests.Response:
    """A generation request as lm_eval's model `lm` sends it (its payload, its `Authorization: Bearer ` header,
    through `requests` as its model_call), with `extra` among the task's generation_kwargs."""
    payload = lm._create_payload(lm.create_message(prompt), generate=True, seed=1234, eos=lm.eos_string,
                                 gen_kwargs={**GEN_KWARGS, **extra})
    return requests.post(lm.base_url, json=payload, headers=lm.header, timeout=60)


def test_completion_fields_vllm_defines_with_budwoods_own_values_are_honoured(url):
    """vLLM's completion extras that ask for what budwood does anyway are accepted; request_id names the answer."""
    body = {"model": BASE, "prompt": "The captain", "max_tokens": 2, "temperature": 0, "use_beam_search": False,
            "skip_special_tokens": True, "include_stop_str_in_output": False, "add_special_tokens": True,
            "min_tokens": 0, "priority": 0, "request_id": "lm-eval-1", "user": None, "prompt_logprobs": None}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["id"] == "cmpl-lm-eval-1", r.text
    for field, value, code in [("add_special_tokens", False, "unsupported_value"),
                               ("prompt_logprobs", 1, "unsupported_parameter"),
                               ("user", "alice", "unsupported_parameter")]:
        r = httpx.post(f"{url}/v1/completions", json={**body, field: value}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == field and r.json()["error"]["code"] == code


def test_the_network_guard_refuses_anything_but_loopback(no_network):
    """The guard the evaluations above ran under holds: a connection out fails before any packet leaves."""
    with pytest.raises(OSError, match="no network"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: routed nowhere
    with pytest.raises(OSError, match="no network"):
        socket.getaddrinfo("huggingface.co", 443)
