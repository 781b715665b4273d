"""What is evaluated: a local base, a base + adapter, or any OpenAI-compatible endpoint.

Suites speak to a Target only in text: chat conversations to answer, (context, continuation) pairs to
score. A local target runs them through the engine's continuous batching; a remote one through the
official openai client, several requests in flight. Log-likelihoods follow lm-evaluation-harness:
the continuation's tokens are those of tokenize(context + continuation) after tokenize(context), with
trailing whitespace of the context moved to the continuation, and no BOS token added.
"""
from __future__ import annotations

import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from budwood.errors import BudwoodError
from budwood.models.fingerprint import adapter_fingerprint

Schedule = Literal["together", "one-by-one", "staggered"]


class EvalTargetError(BudwoodError):
    pass


class TargetInfo(BaseModel):
    spec: str
    kind: Literal["local", "openai"]
    base: str | None = None
    base_fingerprint: str | None = None
    adapter: str | None = None
    adapter_fingerprint: str | None = None
    model: str | None = None  # the endpoint's model id
    endpoint: str | None = None
    precision: str | None = None
    quantization: str | None = None  # local targets: how the base was held (none, nf4, int8)
    device: str | None = None
    system_fingerprint: str | None = None


@dataclass
class LogLik:
    logprob: float
    is_greedy: bool
    n_tokens: int


@dataclass
class Gen:
    temperature: float = 0.0
    max_tokens: int = 64
    seed: int | None = None
    logprobs: bool = False  # ask for the answer's token log-probabilities (Completion.token_logprobs)


@dataclass
class Completion:
    """One generated answer; `token_logprobs` (one per generated token) when asked for and the target
    returns them, else None."""
    text: str
    token_logprobs: list[float] | None = None


@dataclass(frozen=True)
class ToolPrompt:
    """A conversation to answer with tools offered (tool_choice "auto": the model calls or answers in text).
    `messages` are OpenAI chat messages, earlier tool_calls and tool results included; `tools` OpenAI tool
    objects."""
    messages: list[dict]
    tools: list[dict]
    parallel_tool_calls: bool | None = None


@dataclass(frozen=True)
class EmittedCall:
    name: str
    arguments: str  # the JSON text the target returned (an endpoint's may not parse: the tools suite checks)


@dataclass
class ToolReply:
    """An answer to a ToolPrompt: its text, its calls, and whether it tried to call in a form that could not
    be read as calls (then `calls` is empty and the attempt is in `content`)."""
    content: str | None
    calls: list[EmittedCall]
    malformed: bool = False


class LocalTarget:
    """A base model (built-in name or folder), optionally with one adapter, in this process."""

    can_score = True

    def __init__(self, spec: str, precision: str = "auto", device: str = "auto", quantization: str | None = None):
        """`quantization` (none, nf4, int8): how the base is held; None loads it as the adapter was trained (its
        budwood.json), so an adapter grown on an int8 base is measured on that base."""
        from budwood.engine import Engine, EngineConfig
        from budwood.models.quant import adapter_quantization, check_quantization

        base, _, adapter_dir = spec.partition("+")
        if quantization is None:
            quantization = adapter_quantization(adapter_dir) if adapter_dir else "none"
        rank = 16
        if adapter_dir:  # room for the adapter's rank (a cat merge's is the sum of its parents')
            from budwood.artifacts import MAX_SERVED_RANK, AdapterDir

            rank = max(rank, int(AdapterDir.open(adapter_dir).config.get("r", rank)))
            if rank > MAX_SERVED_RANK:
                raise BudwoodError(f"{adapter_dir}: rank {rank} is above the engine's largest ({MAX_SERVED_RANK}); "
                                   "evaluate a lower-rank merge (budwood merge --method svd --rank N) or the "
                                   "model merged into its base (--into-base)")
        # larger steps than serving's: evaluation wants throughput, not latency
        self.engine = Engine(EngineConfig(base=base, precision=precision, device=device, max_num_seqs=128,
                                          max_batch_tokens=1024, max_lora_rank=rank,
                                          quantization=check_quantization(quantization)))
        self.adapter: str | None = None
        adapter_fp = None
        if adapter_dir:
            path = Path(adapter_dir).expanduser()
            self.engine.register_adapter("eval", path)
            self.adapter = "eval"
            adapter_fp = adapter_fingerprint(path)
        eng = self.engine
        self.info = TargetInfo(spec=spec, kind="local", base=base, base_fingerprint=eng.base_fingerprint,
                               adapter=adapter_dir or None, adapter_fingerprint=adapter_fp,
                               precision=str(eng.dtype).removeprefix("torch."), device=eng.device.type,
                               system_fingerprint=eng.system_fingerprint, quantization=quantization)
        tok = eng.tokenizer
        # lm-evaluation-harness scores an empty context from this token
        self.prefix_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def adapter_data(self) -> dict | None:
        """The provenance budwood.json of the adapter, for its recorded data splits."""
        if not self.info.adapter:
            return None
        prov = Path(self.info.adapter) / "budwood.json"
        return json.loads(prov.read_text()) if prov.exists() else None

    def chat(self, conversations: list[list[dict]], gen: Gen, schedule: Schedule = "together") -> list[str]:
        return [c.text for c in self.generate(conversations, gen, schedule)]

    def generate(self, conversations: list[list[dict]], gen: Gen, schedule: Schedule = "together"
                 ) -> list[Completion]:
        from budwood.engine import SamplingParams, merge_outputs

        eng, lora = self.engine, self.engine.adapter(self.adapter)
        prompts = [eng.chat_prompt(c, lora) for c in conversations]
        params = SamplingParams(max_tokens=gen.max_tokens, temperature=gen.temperature, seed=gen.seed,
                                logprobs=0 if gen.logprobs else None)
        if schedule == "one-by-one":
            return [self._texts(eng.generate([p], params, [self.adapter]))[0] for p in prompts]
        if schedule == "together":
            return self._texts(eng.generate(prompts, params, [self.adapter] * len(prompts)))
        # staggered: each request arrives while the earlier ones are mid-prompt or mid-answer
        merged: dict[str, object] = {}
        order = []
        for i, p in enumerate(prompts):
            order.append(eng.add_request(p, params, lora).request_id)
            for _ in range(1 + i % 3):
                for out in eng.step():
                    merged[out.request_id] = merge_outputs(merged.get(out.request_id), out)
        while eng.has_unfinished():
            for out in eng.step():
                merged[out.request_id] = merge_outputs(merged.get(out.request_id), out)
        return self._texts([merged[r] for r in order])

    def generate_tools(self, prompts: list[ToolPrompt], gen: Gen) -> list[ToolReply]:
        """Each prompt rendered through the chat template with its tools, answered, and parsed as the template's
        tool-call format reads back (engine.tools): what `budwood serve` returns for tool_choice "auto". A
        template without tool support is refused by name. `parallel_tool_calls` false is not enforced: every
        call the model writes is returned, so writing two where one is asked for counts against it."""
        from budwood.engine import SamplingParams
        from budwood.engine.tools import parse_tool_calls

        eng, lora = self.engine, self.engine.adapter(self.adapter)
        fmt = eng.tool_format(lora)
        if fmt is None:
            whose = f"adapter {self.info.adapter}" if self.info.adapter else f"base model {self.info.base}"
            raise EvalTargetError(f"the chat template of {whose} has no tool support (it renders no tool "
                                  "definitions and no known tool-call format): the tools suite cannot run on it")
        ids = [eng.chat_prompt(p.messages, lora, tools=p.tools) for p in prompts]
        params = SamplingParams(max_tokens=gen.max_tokens, temperature=gen.temperature, seed=gen.seed)
        replies = []
        for done in self._texts(eng.generate(ids, params, [self.adapter] * len(ids))):
            parsed = parse_tool_calls(done.text, fmt)
            calls = [EmittedCall(c.name, c.arguments) for c in parsed.tool_calls]
            replies.append(ToolReply(parsed.content, calls, not calls and _tried_to_call(done.text, fmt)))
        return replies

    @staticmethod
    def _texts(outputs) -> list[Completion]:
        return [Completion(c.text, [lp.logprob for lp in c.logprobs] if c.logprobs else None)
                for c in (o.choices[0] for o in outputs)]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-evaluation-harness's _encode_pair."""
        context, continuation = _move_whitespace(context, continuation)
        if not context:
            ctx, cont = [self.prefix_id], self.engine.encode(continuation)
        else:
            whole = self.engine.encode(context + continuation)
            ctx = self.engine.encode(context)
            cont = whole[len(ctx):]
        # too long for the model: drop context from the left, as lm-evaluation-harness does
        room = self.engine.runner.max_model_len - len(cont)
        if room < 1:
            raise EvalTargetError(f"a continuation of {len(cont)} tokens does not fit the model's "
                                  f"{self.engine.runner.max_model_len}-token context")
        return ctx[-room:], cont

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[LogLik]:
        import torch

        encoded = [self.encode_pair(c, x) for c, x in pairs]
        scores = self.engine.score_continuations(encoded, self.adapter)
        # summed as a float32 tensor, as lm-evaluation-harness sums them, so the last bits agree too
        return [LogLik(float(torch.tensor(s.token_logprobs, dtype=torch.float32).sum()), s.is_greedy, len(e[1]))
                for s, e in zip(scores, encoded)]

    def chat_loss(self, conversations: list[list[dict]]) -> list[tuple[float, int]]:
        """(summed log-likelihood, tokens) of each conversation's last assistant turn, template included,
        as training's loss counts it."""
        eng, lora = self.engine, self.engine.adapter(self.adapter)
        pairs = []
        for conv in conversations:
            ctx = eng.chat_prompt(conv[:-1], lora)
            full = eng.chat_prompt(conv, lora, add_generation_prompt=False)
            if full[:len(ctx)] != ctx or len(full) == len(ctx):
                raise EvalTargetError("the chat template does not render the prompt as a prefix of the whole "
                                      "conversation, so the answer's tokens cannot be scored")
            pairs.append((ctx, full[len(ctx):]))
        scores = eng.score_continuations(pairs, self.adapter)
        return [(s.logprob, len(p[1])) for s, p in zip(scores, pairs)]


class OpenAITarget:
    """Any OpenAI-compatible endpoint: `openai:BASE_URL#MODEL`, key from an environment variable.

    Log-likelihoods come from completions with echo + logprobs over the text context + continuation
    (the endpoint tokenizes). Two differences from a local target follow from the API: the first token
    of a text has no log-probability, so a continuation scored from an empty context (CrowS-Pairs)
    leaves its first token out; and endpoints add their tokenizer's BOS token to text prompts where it
    has one (vLLM and budwood serve do), while local scoring adds none, as lm-evaluation-harness.
    """

    def __init__(self, spec: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8, timeout: float = 120):
        import openai

        url, _, model = spec.removeprefix("openai:").partition("#")
        if not url.startswith(("http://", "https://")) or not model:
            raise EvalTargetError(f"bad target {spec!r}: expected openai:BASE_URL#MODEL, "
                                  "e.g. openai:http://127.0.0.1:8000/v1#budwood-tiny")
        self.client = openai.OpenAI(base_url=url, api_key=os.environ.get(api_key_env) or "EMPTY",
                                    timeout=timeout, max_retries=2)
        self.model, self.concurrency = model, concurrency
        try:
            ids = [m.id for m in self.client.models.list()]
        except openai.APIConnectionError as e:
            raise EvalTargetError(f"cannot reach {url}: {e.__cause__ or e}") from e
        except openai.APIStatusError as e:
            raise EvalTargetError(f"{url}/models answered {e.status_code}: {e.message}") from e
        if ids and model not in ids:
            from budwood.errors import did_you_mean
            raise EvalTargetError(f"{url} does not serve model {model!r}{did_you_mean(model, ids)}; "
                                  f"it serves {', '.join(ids[:10])}")
        self.info = TargetInfo(spec=spec, kind="openai", model=model, endpoint=url)
        self.can_score = self._probe_logprobs()
        self.refuses_logprobs = False  # set when a chat request with logprobs was refused

    def _probe_logprobs(self) -> bool:
        """Log-likelihood suites need completions with echo + logprobs (as lm-evaluation-harness uses)."""
        try:
            r = self.client.completions.create(model=self.model, prompt="The sky is blue", max_tokens=0,
                                               echo=True, logprobs=1, temperature=0)
            lp = r.choices[0].logprobs
            return bool(lp and lp.token_logprobs and lp.text_offset and len(lp.token_logprobs) > 1)
        except Exception:  # noqa: BLE001 - any refusal means: no log-likelihoods here
            return False

    def _map(self, fn, items: list, workers: int) -> list:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(fn, items))

    def chat(self, conversations: list[list[dict]], gen: Gen, schedule: Schedule = "together") -> list[str]:
        return [c.text for c in self.generate(conversations, gen, schedule)]

    def generate(self, conversations: list[list[dict]], gen: Gen, schedule: Schedule = "together"
                 ) -> list[Completion]:
        """With gen.logprobs, the API's `logprobs` are asked for; an endpoint that does not return them
        gives completions with token_logprobs None (their confidence is unavailable, never guessed)."""
        import openai

        def one(conv: list[dict]) -> Completion:
            asked = gen.logprobs and not self.refuses_logprobs
            try:
                try:
                    r = self.client.chat.completions.create(
                        model=self.model, messages=conv, max_tokens=gen.max_tokens, temperature=gen.temperature,
                        seed=gen.seed, **({"logprobs": True} if asked else {}))
                except openai.BadRequestError:
                    if not asked:
                        raise
                    self.refuses_logprobs = True  # the same request without them: answers, no confidence
                    return one(conv)
            except openai.APIError as e:
                raise EvalTargetError(f"{self.info.endpoint}: chat completion failed: {e}") from e
            self.info.system_fingerprint = r.system_fingerprint or self.info.system_fingerprint
            choice = r.choices[0]
            content = choice.logprobs.content if asked and choice.logprobs else None
            return Completion(choice.message.content or "", [t.logprob for t in content] if content else None)

        if schedule == "one-by-one":
            return [one(c) for c in conversations]
        if schedule == "staggered":  # all in flight at once, arriving in a jittered order
            rng = random.Random(len(conversations))
            jitter = [(rng.random() * 0.05, c) for c in conversations]

            def delayed(item: tuple[float, list[dict]]) -> Completion:
                time.sleep(item[0])
                return one(item[1])
            return self._map(delayed, jitter, len(conversations))
        return self._map(one, conversations, self.concurrency)

    def generate_tools(self, prompts: list[ToolPrompt], gen: Gen) -> list[ToolReply]:
        """Each prompt sent with its `tools` and tool_choice "auto" (parallel_tool_calls where the prompt sets
        it), the calls read from message.tool_calls as the endpoint returned them. An endpoint that refuses
        tools is an error naming it."""
        import openai

        def one(p: ToolPrompt) -> ToolReply:
            extra = {} if p.parallel_tool_calls is None else {"parallel_tool_calls": p.parallel_tool_calls}
            try:
                r = self.client.chat.completions.create(
                    model=self.model, messages=p.messages, tools=p.tools, tool_choice="auto",
                    max_tokens=gen.max_tokens, temperature=gen.temperature, seed=gen.seed, **extra)
            except openai.BadRequestError as e:
                raise EvalTargetError(f"{self.info.endpoint}: model {self.model!r} refused a request with tools: "
                                      f"{e.message}") from e
            except openai.APIError as e:
                raise EvalTargetError(f"{self.info.endpoint}: chat completion with tools failed: {e}") from e
            self.info.system_fingerprint = r.system_fingerprint or self.info.system_fingerprint
            message = r.choices[0].message
            calls, other = [], False
            for c in message.tool_calls or []:
                if getattr(c, "type", "function") == "function" and getattr(c, "function", None) is not None:
                    calls.append(EmittedCall(c.function.name, c.function.arguments))
                else:  # a custom tool call: not a function call the schemas describe
                    other = True
            return ToolReply(message.content, calls, other)

        return self._map(one, prompts, self.concurrency)

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[LogLik]:
        import openai

        def one(pair: tuple[str, str]) -> LogLik:
            context, continuation = _move_whitespace(*pair)
            try:
                r = self.client.completions.create(model=self.model, prompt=context + continuation, max_tokens=0,
                                                   echo=True, logprobs=1, temperature=0)
            except openai.APIError as e:
                raise EvalTargetError(f"{self.info.endpoint}: scoring failed: {e}") from e
            lp = r.choices[0].logprobs
            total, greedy, n = 0.0, True, 0
            for tlp, off, top in zip(lp.token_logprobs, lp.text_offset,
                                     lp.top_logprobs or [None] * len(lp.tokens)):
                if off < len(context) or tlp is None:  # a text's first token has no logprob: see class doc
                    continue
                total += tlp
                n += 1
                if top:
                    greedy = greedy and max(top.values()) <= tlp + 1e-6
            return LogLik(total, greedy, n)
        return self._map(one, pairs, self.concurrency)

    def chat_loss(self, conversations: list[list[dict]]) -> list[tuple[float, int]]:
        raise EvalTargetError("loss and perplexity need the model's chat template: local targets only")


def _tried_to_call(text: str, fmt) -> bool:
    """Whether an answer whose calls did not parse was still an attempt at a call in the template's format
    (parse_tool_calls returns such an answer as text): a Hermes `<tool_call>` tag, or a Llama-3 answer that
    opens a JSON object."""
    from budwood.engine.tools import ToolFormat

    if fmt is ToolFormat.HERMES:
        return "<tool_call>" in text
    return text.strip().removeprefix("<|python_tag|>").lstrip().startswith("{")


def _move_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """lm-evaluation-harness moves the context's trailing whitespace to the continuation."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def open_target(spec: str, precision: str = "auto", device: str = "auto", api_key_env: str = "OPENAI_API_KEY",
                concurrency: int = 8) -> LocalTarget | OpenAITarget:
    """`budwood-tiny` or a model path; `BASE+ADAPTER_DIR`; `openai:BASE_URL#MODEL`."""
    if spec.startswith("openai:"):
        return OpenAITarget(spec, api_key_env, concurrency)
    base, _, adapter = spec.partition("+")
    if adapter and not (Path(adapter).expanduser() / "adapter_config.json").exists():
        raise EvalTargetError(f"{adapter}: not an adapter directory (no adapter_config.json)")
    if not base:
        raise EvalTargetError(f"bad target {spec!r}: expected MODEL, MODEL+ADAPTER_DIR or openai:BASE_URL#MODEL")
    return LocalTarget(spec, precision, device)
