"""The engine: one base model, many adapters, continuous batching; `step()` = schedule → run → sample.

The synchronous `Engine` is what evaluation uses (`generate`, `score_continuations`); the server
wraps it in `AsyncEngine` (async_engine.py), which runs steps on one thread and streams results to
asyncio callers. A step's parts live next door: the scheduler picks the tokens (scheduler.py), the
runner computes their logits (runner.py), the sampler picks the next tokens (sampling.py), and the
detokeniser turns them into text and streaming deltas (output.py).

Reproducibility contract (see docs/serving.md): with `seed` set, a request's tokens depend only on
(base weights, adapter weights, prompt tokens, sampling parameters, seed, choice index) — not on
batch size, batch composition, arrival order, prefix-cache hits or concurrency — for the same
hardware, dtype, torch and BLAS build.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from budwood.engine.adapters import (
    AdapterCache,
    AdapterError,
    AdapterResolver,
    FolderResolver,
    LoadedAdapter,
    StaticResolver,
    load_adapter,
)
from budwood.engine.cache import BlockPool
from budwood.engine.chat_template import TemplateBudget, bounded_rendering, check_rendered
from budwood.engine.output import FinishReason, IncrementalDetokenizer, RequestOutput, merge_outputs
from budwood.engine.runner import Runner, StepItem
from budwood.engine.sampling import ParamError, SamplingParams, make_generator, sample_row, top_logprobs
from budwood.engine.scheduler import Scheduler, Sequence
from budwood.engine.tools import ToolFormat, template_tool_format


class EngineConfig(BaseModel):
    """How the engine is built and how much it takes on at once; part of `budwood serve`'s config."""

    model_config = ConfigDict(extra="forbid")
    base: str = Field("budwood-tiny", description="base model: budwood-tiny, a local HF folder or a hub id")
    adapters: str | None = Field(None, description="folder whose subfolders are adapter directories")
    precision: str = Field("auto", pattern="^(auto|fp32|bf16)$",
                           description="weights dtype; auto: bf16 where the device runs it fast, else fp32")
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), or a torch device such as cuda:1")
    quantization: Literal["none", "nf4", "int8"] = Field(
        "none", description="hold the base's linear weights quantised: int8 (cpu: torchao; cuda: bitsandbytes) or "
        "nf4 (cuda: bitsandbytes); adapters stay float (docs/quantization.md)")
    max_loaded_adapters: int = Field(8, ge=1, description="adapters kept in memory (LRU)")
    max_num_seqs: int = Field(64, ge=1, description="sequences decoding at once")
    max_batch_tokens: int = Field(512, ge=16, description="tokens per step (decode + prompt chunks)")
    kv_cache_tokens: int = Field(65536, ge=256, description="KV-cache capacity in tokens")
    block_size: int = Field(64, ge=16, description="KV-cache block and attention block size")
    max_lora_rank: int = Field(16, ge=1, le=512, description="largest adapter rank served (smaller ranks are "
                               "padded to it, so an adapter's numbers never depend on its batch)")
    batch_invariant: bool = Field(True, description="seeded outputs independent of the batch (see docs)")
    max_queue: int = Field(256, ge=1, description="requests waiting or running before 429")
    served_model_name: list[str] = Field(default_factory=list, description="the names the base answers to (vLLM's "
                                         "--served-model-name; the first is listed); default: `base`")
    lora_modules: dict[str, str] = Field(default_factory=dict, description="adapters served by name from a folder "
                                         "each (vLLM's --lora-modules name=path), checked at start")


class ToolsUnsupported(ParamError):
    """`tools` for a model whose chat template cannot render them."""


class RequestTooLong(ParamError):
    """The prompt and max_tokens do not fit the context length or the KV cache."""


@dataclass
class Request:
    """One request's choices: the scheduler's sequences and, index for index, their detokenisers."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    detokenizers: list[IncrementalDetokenizer] = field(default_factory=list)


@dataclass
class ContinuationScore:
    """log P(continuation | context), as evaluation's loglikelihood tasks want it."""
    logprob: float  # sum over the continuation's tokens
    is_greedy: bool  # every continuation token was the argmax
    token_logprobs: list[float]


class Engine:
    """The synchronous engine: add requests, call `step()` until none is unfinished.

    Not thread-safe: one thread steps it (AsyncEngine's, or the caller's in `generate`)."""

    def __init__(self, config: EngineConfig | None = None, resolvers: list[AdapterResolver] | None = None,
                 **overrides):
        """`resolvers`: more ways to find adapters by name (the registry's), after the built-in ones."""
        from budwood.models.fingerprint import model_fingerprint
        from budwood.models.load import load_base, pick_device, pick_dtype

        self.config = config = (config or EngineConfig()).model_copy(update=overrides)
        device = pick_device(config.device)
        dtype = pick_dtype(config.precision, device)
        base = load_base(config.base, dtype=dtype, device=device, quantization=config.quantization)
        self.base_names = list(dict.fromkeys(config.served_model_name)) or [config.base]
        self.base_name, self.tokenizer = self.base_names[0], base.tokenizer
        self.base_fingerprint = model_fingerprint(config.base)
        num_blocks = -(-config.kv_cache_tokens // config.block_size) + 1
        self.runner = Runner(base.model, block_size=config.block_size, num_blocks=num_blocks,
                             batch_invariant=config.batch_invariant, max_lora_rank=config.max_lora_rank)
        self.device, self.dtype = device, dtype
        self.scheduler = Scheduler(BlockPool(num_blocks, config.block_size), config.max_batch_tokens,
                                   config.max_num_seqs)
        self.static = StaticResolver()
        for name, folder in config.lora_modules.items():  # vLLM's --lora-modules: served by name, loaded on first use
            path = Path(folder).expanduser().resolve()
            if name in self.base_names or not name:
                raise AdapterError(f"lora_modules: {name!r} is the base's name; give the adapter another")
            if not (path / "adapter_config.json").is_file():
                raise AdapterError(f"lora_modules: {name}={folder}: not an adapter directory (no adapter_config.json)")
            self.static.paths[name] = path
        resolvers = [self.static] + ([FolderResolver(config.adapters)] if config.adapters else []) + (resolvers or [])
        self.adapters = AdapterCache(resolvers, self._load_adapter, config.max_loaded_adapters)
        self.stop_ids = _stop_ids(base.model, self.tokenizer)
        self.requests: dict[str, Request] = {}
        from budwood import __version__
        # the same for the same weights, dtype, device and software: OpenAI's system_fingerprint
        self.system_fingerprint = "fp_" + uuid.uuid5(uuid.NAMESPACE_OID, "|".join(
            [self.base_fingerprint, str(dtype), device.type, torch.__version__, __version__,
             str(config.batch_invariant)] + ([config.quantization] if config.quantization != "none" else [])
        )).hex[:12]

    # -- adapters ---------------------------------------------------------------------------------
    def _load_adapter(self, name: str, path: Path) -> LoadedAdapter:
        adapter = load_adapter(name, path, self.runner.shapes, len(self.runner.layers), self.device,
                               self.base_fingerprint)
        self.runner.pack_adapter(adapter)  # checks the rank, and keeps the first request from paying for it
        return adapter

    def adapter(self, name: str | None) -> LoadedAdapter | None:
        """None or the base's own name mean the bare base."""
        if name is None or name in self.base_names:
            return None
        return self.adapters.get(name)

    def register_adapter(self, name: str, path: str | Path) -> LoadedAdapter:
        """Serve the adapter at `path` as `name` (checked by loading it now)."""
        path = Path(path).expanduser().resolve()
        try:
            existing = self.adapters.resolve(name)
        except AdapterError:
            existing = None
        if existing is not None and existing != path and name not in self.static.paths:
            raise AdapterError(f"adapter name {name!r} is already served from {existing.name}; choose another name")
        if not (path / "adapter_config.json").exists():
            raise AdapterError(f"{path}: not an adapter directory (no adapter_config.json)")
        adapter = self._load_adapter(name, path)
        self.static.paths[name] = path
        self.adapters.forget(name)
        self.adapters.get(name)
        return adapter

    def unregister_adapter(self, name: str) -> None:
        if name not in self.static.paths:
            raise AdapterError(f"adapter {name!r} was not loaded with load_lora_adapter (folder adapters are "
                               "removed by removing their folder)")
        self.static.paths.pop(name, None)
        self.adapters.forget(name)

    # -- prompts ----------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], adapter: LoadedAdapter | None = None,
                    add_generation_prompt: bool = True, budget: TemplateBudget | None = None,
                    tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation through the chat template (the adapter's own if it ships one),
        rendered within `budget` (an adapter's template is its publisher's code): a template that runs
        too long or renders too much raises TemplateBudgetExceeded naming it. `tools` (OpenAI tool objects)
        go to the template as transformers passes them; a template without tool support is refused."""
        template = adapter.chat_template if adapter is not None and adapter.chat_template else None
        budget = budget or TemplateBudget()
        name = f"the chat template of adapter {adapter.name!r}" if template else "the base model's chat template"
        if tools and self.tool_format(adapter) is None:
            raise ToolsUnsupported("tools", f"{name} does not support tools (it renders no tool definitions and no "
                                   "known tool-call format)")
        with bounded_rendering(budget, name):
            text = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      tools=tools or None)
        return self.tokenizer(check_rendered(text, budget, name), add_special_tokens=False)["input_ids"]

    def tool_format(self, adapter: LoadedAdapter | None = None) -> ToolFormat | None:
        """How the chat template in use (the adapter's own, else the base's) writes tool calls; None: no tools."""
        template = adapter.chat_template if adapter is not None and adapter.chat_template else None
        return template_tool_format(template or self.tokenizer.chat_template)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, adapter: LoadedAdapter | None = None,
                    request_id: str | None = None, logprobs_from: int = 1,
                    after: Sequence | None = None) -> Request:
        """Queue a request's `params.n` choices; choice i samples with seed + i.

        `logprobs_from`: first prompt index whose log-probability is reported (prompt_logprobs);
        `after`: a sequence whose prompt this one extends, admitted once that prompt is cached."""
        max_new = self._check_request(prompt_ids, params)
        request = Request(request_id or uuid.uuid4().hex, list(prompt_ids), params)
        first = None
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            seq = Sequence(request.request_id, i, list(prompt_ids), len(prompt_ids), max_new, params, adapter,
                           make_generator(seed, self.device), logprobs_from=logprobs_from,
                           after=after if i == 0 else first,
                           matcher=params.grammar.matcher() if params.grammar is not None else None)
            first = first or seq
            request.seqs.append(seq)
            request.detokenizers.append(IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop))
            self.scheduler.add(seq)
        self.requests[request.request_id] = request
        return request

    def _check_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """The request's max new tokens, or a ParamError naming the field that makes it impossible."""
        if not prompt_ids:
            raise ParamError("prompt", "the prompt is empty")
        vocab = self.runner.vocab_size
        for field_, ids in (("prompt", prompt_ids), ("logit_bias", params.logit_bias),
                            ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ParamError(field_, f"{field_}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        limit = self.runner.max_model_len
        capacity = (self.scheduler.pool.num_blocks - 1) * self.scheduler.pool.block_size
        # no max_tokens: up to the context length or what the KV cache holds, whichever is less
        max_new = min(limit, capacity) - len(prompt_ids) if params.max_tokens is None else params.max_tokens
        if len(prompt_ids) + max_new > limit or max_new < 0:
            raise RequestTooLong("messages" if params.max_tokens is None else "max_tokens",
                                 f"This model's maximum context length is {limit} tokens. However, you requested "
                                 f"{len(prompt_ids) + max(max_new, 0)} tokens ({len(prompt_ids)} in the prompt, "
                                 f"{max(max_new, 0)} for the completion). Please reduce the length.")
        if len(prompt_ids) + max_new > capacity:
            raise RequestTooLong("max_tokens", f"prompt + max_tokens = {len(prompt_ids) + max_new} tokens exceed "
                                               f"the KV cache ({capacity} tokens)")
        return max_new

    def abort(self, request_id: str) -> None:
        """Drop a request (its caller went away); it produces no further output."""
        request = self.requests.pop(request_id, None)
        for seq in request.seqs if request else []:
            if not seq.finished:
                self.scheduler.finish(seq, FinishReason.ABORT)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """One forward over the scheduled tokens; returns what each touched request gained."""
        plan = self.scheduler.schedule()
        if not plan:
            return []
        items = [StepItem(s.seq.blocks, s.seq.computed, s.seq.tokens[s.seq.computed:s.seq.computed + s.n],
                          s.seq.adapter, s.logits_from, s.seq.uid) for s in plan]
        logits = self.runner.forward(items)
        touched: dict[str, Request] = {}
        at = 0
        for s in plan:
            seq, rows = s.seq, logits[at:at + s.n - s.logits_from]
            at += s.n - s.logits_from
            start = seq.computed
            self.scheduler.computed(seq, s.n)
            request = touched[seq.request_id] = self.requests[seq.request_id]
            if seq.params.prompt_logprobs is not None and start < seq.prompt_len:
                self._prompt_logprobs(seq, start + s.logits_from, rows)
            if seq.computed == len(seq.tokens) and len(rows):
                self._sample(seq, rows[-1], request.detokenizers[seq.index])
        return [self._output(r) for r in touched.values()]

    def _prompt_logprobs(self, seq: Sequence, first_pos: int, rows: torch.Tensor) -> None:
        """Row j holds the prediction for token first_pos + j + 1."""
        if not seq.prompt_logprobs:
            seq.prompt_logprobs = [None] * seq.prompt_len
        targets = [(j, first_pos + j + 1) for j in range(len(rows)) if first_pos + j + 1 < seq.prompt_len]
        if not targets:
            return
        lp = torch.log_softmax(rows[[j for j, _ in targets]], dim=-1)
        for (_, pos), v in zip(targets, top_logprobs(lp, [seq.tokens[p] for _, p in targets],
                                                     seq.params.prompt_logprobs)):
            seq.prompt_logprobs[pos] = v

    def _sample(self, seq: Sequence, row: torch.Tensor, detok: IncrementalDetokenizer) -> None:
        """Append the next token from the sequence's logits row, then end it at an end-of-turn or stop
        token (once its grammar allows), a stop string, or max_tokens."""
        params = seq.params
        if seq.max_new == 0:
            self.scheduler.finish(seq, FinishReason.LENGTH)
            return
        allowed = seq.matcher.allowed().to(row.device) if seq.matcher is not None else None
        stop_ids = self.stop_ids + params.stop_token_ids
        token = sample_row(row, params, seq.output_ids, seq.tokens[:seq.prompt_len], seq.generator, allowed,
                           self.stop_ids)
        if params.logprobs is not None:
            seq.logprobs.append(top_logprobs(torch.log_softmax(row[None], -1), [token], params.logprobs)[0])
        seq.tokens.append(token)
        if seq.matcher is not None and token not in stop_ids:
            seq.matcher.accept(token)
        grammar_done = seq.matcher is not None and seq.matcher.is_done()
        if token in stop_ids and (grammar_done or not (params.ignore_eos and token in self.stop_ids)):
            self.scheduler.finish(seq, FinishReason.STOP)
            detok.add_stop_token()
        elif detok.add_token(seq.tokens):
            self.scheduler.finish(seq, FinishReason.STOP)
        elif len(seq.output_ids) >= seq.max_new:
            self.scheduler.finish(seq, FinishReason.LENGTH)

    def _output(self, request: Request) -> RequestOutput:
        """The new text, tokens and logprobs of each choice since the last output."""
        choices = [delta for seq, detok in zip(request.seqs, request.detokenizers)
                   if (delta := detok.delta(seq.index, seq.output_ids, seq.logprobs, seq.finish_reason))]
        finished = all(s.finished for s in request.seqs)
        if finished:
            self.requests.pop(request.request_id, None)
        first = request.seqs[0]
        return RequestOutput(request.request_id, request.prompt_ids, choices, finished, len(request.prompt_ids),
                             sum(len(s.output_ids) for s in request.seqs),
                             first.prompt_logprobs if first.params.prompt_logprobs is not None else None)

    # -- whole jobs -------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: list[str | None] | None = None) -> list[RequestOutput]:
        """Run prompts to completion together; one merged output per prompt, in order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        reqs = [self.add_request(p, sp, self.adapter(a)) for p, sp, a in zip(prompts, params, adapters)]
        merged = {r.request_id: None for r in reqs}
        while self.has_unfinished():
            for out in self.step():
                merged[out.request_id] = merge_outputs(merged.get(out.request_id), out)
        return [merged[r.request_id] for r in reqs]

    def score_continuations(self, pairs: list[tuple[list[int], list[int]]],
                            adapter: str | None = None) -> list[ContinuationScore]:
        """log P(continuation | context) for each pair, batched; a context shared by several pairs is
        computed once (the later pairs reuse its cached blocks)."""
        lora = self.adapter(adapter)
        params = SamplingParams(max_tokens=0, prompt_logprobs=1)
        firsts: dict[tuple[int, ...], Sequence] = {}
        reqs = []
        for ctx, cont in pairs:
            if not ctx or not cont:
                raise ParamError("continuation", "both context and continuation need at least one token")
            key = tuple(ctx)
            req = self.add_request(list(ctx) + list(cont), params, lora, logprobs_from=len(ctx),
                                   after=firsts.get(key))
            firsts.setdefault(key, req.seqs[0])
            reqs.append((req, len(ctx)))
        while self.has_unfinished():
            self.step()
        out = []
        for req, n_ctx in reqs:
            seq = req.seqs[0]
            lps = seq.prompt_logprobs[n_ctx:]
            out.append(ContinuationScore(sum(lp.logprob for lp in lps), all(lp.is_top for lp in lps),
                                         [lp.logprob for lp in lps]))
        return out


def _stop_ids(model, tokenizer) -> list[int]:
    """End-of-turn tokens: the generation config may list several (Llama 3 lists three)."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
