"""The engine against Hugging Face and peft, and its reproducibility contract."""
import json
import shutil

import pytest
import torch

from budwood.engine import Engine, EngineConfig, SamplingParams
from budwood.engine.adapters import AdapterError
from budwood.engine.runner import probe_row_floor
from budwood.models.load import load_base

QUESTIONS = ["Who wrote Emma?", "Tell me a story about a dog and a cat.", "Hi",
             "Why is the sky blue? Explain in detail, please.", "What is the capital of France?",
             "List three fruits.", "Describe the sea at night.", "What did the old man say to the boy?"]


@pytest.fixture(scope="module")
def engines(tiny_adapters):
    """One fp32 and one bf16 engine over the same adapters (loading takes a few seconds each)."""
    return {p: Engine(EngineConfig(adapters=str(tiny_adapters), precision=p, max_batch_tokens=128))
            for p in ("fp32", "bf16")}


def prompts(engine):
    return [engine.chat_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]


def hf_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


@pytest.mark.parametrize("adapter", [None, "alpha", "beta", "gamma"])
def test_per_row_lora_equals_peft_in_fp32(engines, tiny_adapters, adapter):
    from peft import PeftModel

    engine = engines["fp32"]
    model = load_base("budwood-tiny", dtype=torch.float32).model
    if adapter:
        model = PeftModel.from_pretrained(model, str(tiny_adapters / adapter))
    ids = prompts(engine)[3]
    ref = hf_logprobs(model.eval(), ids)
    got = engine.score_continuations([(ids[:2], ids[2:])], adapter=adapter)[0]
    want = [ref[i - 1, ids[i]].item() for i in range(2, len(ids))]
    assert got.token_logprobs == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_mixed_batch_scores_equal_each_alone(engines):
    """Rows of different adapters in one forward get exactly their own adapter's numbers."""
    engine = engines["fp32"]
    ids = prompts(engine)[1]
    pair = [(ids[:3], ids[3:])]
    alone = {a: engine.score_continuations(pair, adapter=a)[0].token_logprobs for a in (None, "alpha", "gamma")}
    assert alone[None] != alone["alpha"] != alone["gamma"]
    reqs = [engine.add_request(ids, SamplingParams(max_tokens=0, prompt_logprobs=0), engine.adapter(a),
                               logprobs_from=3) for a in (None, "alpha", "gamma")]
    while engine.has_unfinished():
        engine.step()
    for req, a in zip(reqs, (None, "alpha", "gamma")):
        assert [lp.logprob for lp in req.seqs[0].prompt_logprobs[3:]] == alone[a]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_seeded_tokens_do_not_depend_on_the_batch(engines, precision):
    """Alone, in a batch of 8 over mixed adapters, in another order with chunked prefill: same tokens."""
    engine = engines[precision]
    ps = prompts(engine)
    adapters = [None, "alpha", "beta", "gamma"] * 2
    params = [SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=100 + i) for i in range(8)]
    alone = [engine.generate([p], sp, [a])[0].choices[0].token_ids for p, sp, a in zip(ps, params, adapters)]
    batch = [o.choices[0].token_ids for o in engine.generate(ps, params, adapters)]
    assert batch == alone
    engine.scheduler.max_batch_tokens = 16  # prompts now prefill in chunks next to decoding rows
    try:
        order = [5, 2, 7, 0, 3, 6, 1, 4]
        shuffled = engine.generate([ps[i] for i in order], [params[i] for i in order], [adapters[i] for i in order])
    finally:
        engine.scheduler.max_batch_tokens = 128
    assert [o.choices[0].token_ids for o in shuffled] == [alone[i] for i in order]
    assert len({tuple(t) for t in alone}) >= 6  # the requests really differ


def test_unseeded_sampling_is_random(engines):
    engine = engines["fp32"]
    p = prompts(engine)[1]
    outs = engine.generate([p] * 4, SamplingParams(max_tokens=16, temperature=1.0))
    assert len({tuple(o.choices[0].token_ids) for o in outs}) > 1


def test_n_choices_follow_seed_plus_index(engines):
    engine = engines["fp32"]
    p = prompts(engine)[6]
    three = engine.generate([p], SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=7))[0]
    assert [c.index for c in three.choices] == [0, 1, 2]
    for i in range(3):
        one = engine.generate([p], SamplingParams(max_tokens=12, temperature=1.0, seed=7 + i))[0]
        assert one.choices[0].token_ids == three.choices[i].token_ids
    assert three.completion_tokens == sum(len(c.token_ids) for c in three.choices)


def test_greedy_is_argmax_and_top_k_1(engines):
    engine = engines["fp32"]
    p = prompts(engine)[0]
    greedy = engine.generate([p], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    topk = engine.generate([p], SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=3,
                                               ignore_eos=True))[0]
    assert greedy.choices[0].token_ids == topk.choices[0].token_ids
    model = load_base("budwood-tiny", dtype=torch.float32).model
    ids = list(p)
    for t in greedy.choices[0].token_ids:
        assert int(hf_logprobs(model, ids)[-1].argmax()) == t
        ids.append(t)


def test_stop_eos_and_length(engines):
    engine = engines["fp32"]
    p = prompts(engine)[0]
    free = engine.generate([p], SamplingParams(max_tokens=40, temperature=0))[0].choices[0]
    assert free.finish_reason == "stop"  # the tiny model ends its answer with <|end|>
    assert engine.stop_ids[0] == free.token_ids[-1] and "<|end|>" not in free.text
    cut = engine.generate([p], SamplingParams(max_tokens=3, temperature=0))[0].choices[0]
    assert cut.finish_reason == "length" and cut.token_ids == free.token_ids[:3]
    word = free.text.split()[2]
    stopped = engine.generate([p], SamplingParams(max_tokens=40, temperature=0, stop=[word, "zzz"]))[0].choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:free.text.index(word)]


def test_logit_bias_and_penalties(engines):
    engine = engines["fp32"]
    p = prompts(engine)[2]
    forced = engine.generate([p], SamplingParams(max_tokens=5, temperature=1.0, seed=1, logit_bias={42: 100},
                                                 ignore_eos=True))[0]
    assert forced.choices[0].token_ids == [42] * 5
    plain = engine.generate([p], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    penal = engine.generate([p], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                frequency_penalty=2.0, presence_penalty=2.0))[0]
    ids = penal.choices[0].token_ids
    assert len(set(ids)) > len(set(plain.choices[0].token_ids)) or len(set(ids)) == len(ids)


def test_logprobs_are_those_of_the_model(engines):
    engine = engines["fp32"]
    p = prompts(engine)[4]
    out = engine.generate([p], SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True))[0]
    model = load_base("budwood-tiny", dtype=torch.float32).model
    ids = list(p)
    for tid, lp in zip(out.choices[0].token_ids, out.choices[0].logprobs):
        ref = hf_logprobs(model, ids)[-1]
        assert lp.token_id == tid and lp.logprob == pytest.approx(ref[tid].item(), abs=1e-5)
        assert [i for i, _ in lp.top] == ref.topk(3).indices.tolist()
        ids.append(tid)


def test_a_cache_salt_keeps_prompts_apart(engines):
    """Requests with different salts (the service's tenants) never reuse each other's cached blocks,
    and the outputs do not depend on it."""
    engine = engines["fp32"]
    prompt = engine.encode("Far out in the uncharted backwaters of the unfashionable end " * 8)
    blocks = len(prompt) // engine.config.block_size * engine.config.block_size

    def hits(salt):
        before = engine.scheduler.cached_tokens
        out = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0, cache_salt=salt))[0]
        return engine.scheduler.cached_tokens - before, out.choices[0].token_ids

    first, tokens = hits("tenant-a")
    again, same = hits("tenant-a")
    other, theirs = hits("tenant-b")
    assert first == 0 and again >= blocks > 0 and other == 0
    assert tokens == same == theirs


def test_shared_contexts_are_computed_once(engines):
    engine = engines["fp32"]
    ctx = engine.encode("The old house stood at the end of the lane, and every evening " * 6)
    conts = [engine.encode(w) for w in (" the", " a cat", " rain fell", " nobody came")]
    before = engine.scheduler.cached_tokens
    scores = engine.score_continuations([(ctx, c) for c in conts])
    hits = engine.scheduler.cached_tokens - before
    assert hits >= 3 * (len(ctx) // engine.config.block_size) * engine.config.block_size > 0
    model = load_base("budwood-tiny", dtype=torch.float32).model
    for c, s in zip(conts, scores):
        ref = hf_logprobs(model, ctx + c)
        assert s.logprob == pytest.approx(sum(ref[len(ctx) + i - 1, t].item() for i, t in enumerate(c)), abs=1e-4)
    greedy = int(hf_logprobs(model, ctx)[-1].argmax())
    assert engine.score_continuations([(ctx, [greedy])])[0].is_greedy


def test_adapter_cache_evicts_least_recently_used(tiny_adapters):
    engine = Engine(EngineConfig(adapters=str(tiny_adapters), precision="fp32", max_loaded_adapters=2))
    a = engine.adapter("alpha")
    engine.adapter("beta")
    assert engine.adapter("alpha") is a  # a hit, and now the most recent
    engine.adapter("gamma")
    assert list(engine.adapters.loaded) == ["alpha", "gamma"]
    assert engine.adapter("beta") is not None and "alpha" not in engine.adapters.loaded


def test_bad_adapters_are_refused(engines, tiny_adapters, tmp_path):
    engine = engines["fp32"]
    pickled = shutil.copytree(tiny_adapters / "alpha", tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterError, match="only safetensors"):
        engine.register_adapter("pickled", pickled)
    wrong_rank = shutil.copytree(tiny_adapters / "alpha", tmp_path / "wrong_rank")
    cfg = json.loads((wrong_rank / "adapter_config.json").read_text())
    (wrong_rank / "adapter_config.json").write_text(json.dumps({**cfg, "r": 32}))
    with pytest.raises(AdapterError, match="do not fit the base"):
        engine.register_adapter("wrong_rank", wrong_rank)
    other_base = shutil.copytree(tiny_adapters / "alpha", tmp_path / "other_base")
    (other_base / "budwood.json").write_text(json.dumps({"base_model": {"fingerprint": "0" * 64}}))
    with pytest.raises(AdapterError, match="another base"):
        engine.register_adapter("other_base", other_base)
    for name, bad in (("nan_alpha", '"lora_alpha": NaN'), ("huge_alpha", '"lora_alpha": 1e308'),
                      ("huge_rank", '"r": 1e999')):  # json.loads reads NaN and 1e999 (inf) as Python does
        folder = shutil.copytree(tiny_adapters / "alpha", tmp_path / name)
        text = json.dumps({k: v for k, v in cfg.items() if k not in ("lora_alpha", "r")})
        (folder / "adapter_config.json").write_text(text[:-1] + ", " + bad + ", " + ('"r": 8}' if "alpha" in name
                                                                                    else '"lora_alpha": 16}'))
        with pytest.raises(AdapterError, match="lora_alpha must be a finite number|r must be an integer rank"):
            engine.register_adapter(name, folder)
    linked = tmp_path / "hub-snapshot"  # a Hugging Face cache snapshot: every file a symlink to a blob
    linked.mkdir()
    for f in (tiny_adapters / "alpha").iterdir():
        (linked / f.name).symlink_to(f)
    engine.register_adapter("hub_snapshot", linked)
    assert engine.generate([prompts(engine)[0]], SamplingParams(max_tokens=2))[0].finished


def test_prompt_too_long_is_refused(engines):
    from budwood.engine import RequestTooLong

    engine = engines["fp32"]
    with pytest.raises(RequestTooLong, match="maximum context length is 2048"):
        engine.add_request([5] * 2000, SamplingParams(max_tokens=100))


def test_long_prompt_does_not_stall_decoding(engines):
    """With a 64-token step budget, a 600-token prompt is spread over steps while another decodes."""
    engine = engines["fp32"]
    engine.scheduler.max_batch_tokens = 64
    try:
        short = engine.add_request(prompts(engine)[2], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        engine.step()  # the short prompt is in and decoding
        long = engine.add_request(engine.encode("word " * 600), SamplingParams(max_tokens=1))
        grew = []
        while not long.seqs[0].prefilled:
            before = len(short.seqs[0].output_ids)
            engine.step()
            grew.append(len(short.seqs[0].output_ids) - before)
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.scheduler.max_batch_tokens = 128
    assert len(grew) >= 9 and all(g == 1 for g in grew[:11])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_finds_batch_invariant_row_counts(dtype):
    floor = probe_row_floor(dtype, torch.device("cpu"), [(256, 384)])
    w = torch.randn(384, 256).to(dtype)
    x = torch.randn(50, 256).to(dtype)
    pad = torch.cat([x, torch.zeros(64, 256, dtype=dtype)])
    for m in range(1, 50):
        assert floor.pad(m) >= m and (floor.pad(m) == m or m < floor.floor)
        rows = pad[:floor.pad(m)] @ w.T
        assert torch.equal(rows[:m], (pad[:64] @ w.T)[:m])


def test_base_answers_in_one_sentence_and_stops(engines):
    """budwood-tiny answers this greedily in one sentence and ends its turn there (no run-on text)."""
    engine = engines["fp32"]
    p = engine.chat_prompt([{"role": "user", "content": "Who wrote Treasure Island?"}])
    answer = engine.generate([p], SamplingParams(max_tokens=120, temperature=0))[0].choices[0]
    assert "Stevenson" in answer.text and len(answer.text) < 80 and "\n" not in answer.text.strip()
    assert answer.finish_reason == "stop"


def test_an_adapter_with_its_own_chat_template_uses_it(engines, tiny_adapters, tmp_path):
    engine = engines["fp32"]
    own = shutil.copytree(tiny_adapters / "alpha", tmp_path / "templated")
    (own / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                                             "{% if add_generation_prompt %}[assistant] {% endif %}")
    adapter = engine.register_adapter("templated", own)
    messages = [{"role": "user", "content": "Hi"}]
    assert engine.tokenizer.decode(engine.chat_prompt(messages, adapter)) == "[user] Hi\n[assistant] "
    assert engine.chat_prompt(messages, engine.adapter("alpha")) == engine.chat_prompt(messages)


def test_vllm_command_serves_the_same_folders(tiny_adapters):
    from budwood.models.load import TINY_DIR
    from budwood.serve.vllm import vllm_command

    cmd = vllm_command("budwood-tiny", tiny_adapters, "0.0.0.0", 9000, "k", 4)
    assert cmd[:3] == ["vllm", "serve", str(TINY_DIR)]
    i = cmd.index("--lora-modules")
    assert cmd[i + 1:i + 4] == [f"{n}={tiny_adapters / n}" for n in ("alpha", "beta", "gamma")]
    assert cmd[cmd.index("--max-lora-rank") + 1] == "16" and cmd[cmd.index("--served-model-name") + 1] == "budwood-tiny"
    assert cmd[cmd.index("--api-key") + 1] == "k" and "--enable-lora" in cmd
    # budwood-tiny's template writes Hermes-style calls: vLLM reads them with its hermes parser
    assert "--enable-auto-tool-choice" in cmd and cmd[cmd.index("--tool-call-parser") + 1] == "hermes"


def test_a_prompt_longer_than_a_step_alone_and_as_a_context(engines):
    """Steps that only carry prompt chunks ending mid-prompt want no logits at all."""
    engine = engines["fp32"]
    long = engine.encode("the river ran on and on " * 120)
    assert len(long) > engine.scheduler.max_batch_tokens
    out = engine.generate([long], SamplingParams(max_tokens=2, temperature=0))[0]
    assert len(out.choices[0].token_ids) >= 1
    assert engine.score_continuations([(long, engine.encode(" and"))])[0].logprob < 0


def test_a_grammar_ends_generation_even_with_ignore_eos_and_limits_come_from_the_cache(engines, tiny_adapters):
    """A finished JSON grammar stops sampling, many stop strings still finish, no max_tokens is bounded by the KV
    cache, and adapters registered by hand cannot be renamed or unloaded the load_lora_adapter way."""
    from budwood.engine.grammar import GrammarCompiler

    engine = engines["fp32"]
    p = prompts(engine)[0]
    grammar = GrammarCompiler(engine.tokenizer, engine.runner.vocab_size, engine.stop_ids).compile(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
            "a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}}})
    done = engine.generate([p], SamplingParams(max_tokens=60, temperature=1.0, seed=2, ignore_eos=True,
                                               grammar=grammar))[0].choices[0]
    assert json.loads(done.text)["a"] is not None and done.finish_reason == "stop"  # the grammar ends it
    many = engine.generate([p], SamplingParams(max_tokens=8, temperature=0, stop=list("abcdef")))[0]
    assert many.finished
    small = Engine(EngineConfig(precision="fp32", kv_cache_tokens=512))
    req = small.add_request(p, SamplingParams(max_tokens=None))  # no max_tokens: bounded by the cache
    assert req.seqs[0].max_new == 512 - len(p)
    with pytest.raises(AdapterError, match="already served"):
        engine.register_adapter("alpha", tiny_adapters / "beta")
    with pytest.raises(AdapterError, match="not loaded with load_lora_adapter"):
        engine.unregister_adapter("alpha")


def test_served_model_names_and_lora_modules_as_vllm_takes_them(tiny_adapters, tmp_path):
    engine = Engine(EngineConfig(precision="fp32", served_model_name=["tiny", "rootstock"],
                                 lora_modules={"support": str(tiny_adapters / "alpha")}))
    assert engine.base_name == "tiny" and engine.adapter("rootstock") is None and engine.adapter("tiny") is None
    assert engine.adapter("support").name == "support"
    messages = [{"role": "user", "content": "Hi"}]
    assert engine.chat_prompt(messages, engine.adapter("support")) == engine.chat_prompt(messages)
    with pytest.raises(AdapterError, match="not an adapter directory"):
        Engine(EngineConfig(precision="fp32", lora_modules={"x": str(tmp_path)}))
    with pytest.raises(AdapterError, match="the base's name"):
        Engine(EngineConfig(precision="fp32", lora_modules={"budwood-tiny": str(tiny_adapters / "alpha")}))


def test_lora_modules_flags_in_both_of_vllms_forms(tiny_adapters):
    from budwood.cli.serve import lora_module
    from budwood.errors import BudwoodError
    from budwood.serve.vllm import vllm_command

    path = str(tiny_adapters / "beta")
    assert lora_module(f"b={path}", ["budwood-tiny"]) == ("b", path)
    assert lora_module(json.dumps({"name": "b", "path": path, "base_model_name": "budwood-tiny"}),
                       ["budwood-tiny"]) == ("b", path)
    for bad in ("b", "=x", '{"name": "b"}', '{"name": "b", "path": "p", "rank": 8}', "{nope",
                json.dumps({"name": "b", "path": path, "base_model_name": "other"})):
        with pytest.raises(BudwoodError, match="--lora-modules"):
            lora_module(bad, ["budwood-tiny"])
    cmd = vllm_command("budwood-tiny", None, "0.0.0.0", 9000, None, 4, ["tiny", "t"], {"b": path})
    assert cmd[cmd.index("--served-model-name") + 1:cmd.index("--served-model-name") + 3] == ["tiny", "t"]
    assert cmd[cmd.index("--lora-modules") + 1] == f"b={path}"
