"""`OpenAIServing`: the OpenAI surface's state and behaviour, one object on `app.state`.

It owns the engine, the AsyncEngine that steps it, the metrics and the grammar compiler, and knows
which models a caller may use (`ModelAccess`). Routes (serve/routes/) are thin: they get it through
`ServingDep` and their caller through `CallerDep`, and call one method. It raises domain errors
(`BudwoodError` with a kind, code and param); serve/errors.py answers them.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from budwood.engine import (
    AsyncEngine,
    Engine,
    EngineConfig,
    FinishReason,
    QueueFull,
    SamplingParams,
    UnknownAdapter,
    merge_outputs,
)
from budwood.engine.adapters import ADAPTER_NAME, AdapterError, file_stamp
from budwood.errors import BudwoodError, ErrorKind, ForbiddenError, LimitExceeded, NotFoundError, did_you_mean
from budwood.eval.calibration import CALIBRATION_FILE, Calibration, load_calibration
from budwood.eval.confidence import (
    AGREEMENT_TEMPERATURE,
    AbstentionPolicy,
    ScoreKind,
    agreement,
    agreement_seeds,
    logprob_confidence,
)
from budwood.models.fingerprint import adapter_fingerprint
from budwood.serve import chat, completions
from budwood.serve.auth import Caller, ModelAccess
from budwood.serve.limits import ServeLimits
from budwood.serve.metrics import Metrics
from budwood.serve.protocol import (
    AbstentionVerdict,
    ChatCompletionRequest,
    CompletionRequest,
    Health,
    LoadAdapterRequest,
    ModelCard,
    ModelList,
)

if TYPE_CHECKING:
    from budwood.engine import RequestOutput
    from budwood.engine.sampling import TokenLogprob

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """What `create_app` was given for the OpenAI surface; the app's lifespan builds OpenAIServing from it."""

    config: EngineConfig | None = None
    engine: Engine | None = None  # an engine already loaded (tests, the service), shared rather than built
    resolvers: list = field(default_factory=list)
    access: ModelAccess | None = None
    metrics_token: str | None = None  # None: /metrics open; "": /metrics off; else its bearer token
    limits: ServeLimits = field(default_factory=ServeLimits)


class OpenAIServing:
    """One per app, built by the lifespan: everything the /v1 inference routes, /health and /metrics do."""

    def __init__(self, engine: Engine, access: ModelAccess, metrics_token: str | None = None,
                 limits: ServeLimits | None = None):
        self.engine = engine
        self.limits = limits or ServeLimits()
        self.async_engine = AsyncEngine(engine)
        self.metrics = Metrics(self.async_engine)
        self.async_engine.on_step = self.metrics.observe_step
        self.access = access
        self.metrics_token = metrics_token
        self._grammar = None  # GrammarCompiler, built on the first response_format that needs one
        self._calibrations: dict[Path, tuple[tuple, Calibration | None]] = {}  # by adapter folder, with its stamp

    @classmethod
    async def start(cls, options: ServeOptions) -> OpenAIServing:
        """Load the engine (in a thread: it takes seconds) or adopt the given one, with the resolvers."""
        if options.engine is None:
            engine = await asyncio.to_thread(Engine, options.config or EngineConfig(), options.resolvers)
        else:
            engine = options.engine
            engine.adapters.resolvers.extend(options.resolvers)
        return cls(engine, options.access, options.metrics_token, options.limits)

    def shutdown(self) -> None:
        self.async_engine.shutdown()

    # -- models -------------------------------------------------------------------------------------
    def usable_names(self, caller: Caller) -> list[str]:
        """The base first, then the adapters and listed names the caller may use."""
        e = self.engine
        return [e.base_name, *(n for n in e.adapters.names() if self.access.can_use(caller, n)),
                *self.access.listed(caller)]

    async def not_found(self, caller: Caller, model: str) -> NotFoundError:
        """The same answer for a model that does not exist and one the caller may not see; suggestions
        only from what the caller may use."""
        hint = did_you_mean(model, await asyncio.to_thread(self.usable_names, caller))
        return NotFoundError(f"The model `{model}` does not exist.{hint}", param="model", code="model_not_found")

    async def resolve(self, caller: Caller, model: str):
        """The adapter `model` names for this caller (None for the base), loaded."""
        if not await asyncio.to_thread(self.access.can_use, caller, model):  # before the engine's cache is asked
            raise await self.not_found(caller, model)
        try:
            return await asyncio.to_thread(self.engine.adapter, model)
        except UnknownAdapter:
            raise await self.not_found(caller, model) from None
        except AdapterError as e:
            raise BudwoodError(str(e), param="model", code="invalid_adapter") from None

    def model_cards(self, caller: Caller) -> list[ModelCard]:
        e = self.engine
        cards = [ModelCard(id=e.base_name, owned_by="budwood", root=e.base_name, parent=None,
                           max_model_len=e.runner.max_model_len)]
        names = set(self.usable_names(caller)[1:])
        cards += [ModelCard(id=name, owned_by=caller.tenant or "budwood", root=name, parent=e.base_name,
                            max_model_len=e.runner.max_model_len) for name in sorted(names)]
        return cards

    async def list_models(self, caller: Caller) -> ModelList:
        return ModelList(data=await asyncio.to_thread(self.model_cards, caller))

    async def model_card(self, caller: Caller, model: str) -> ModelCard:
        for card in await asyncio.to_thread(self.model_cards, caller):
            if card.id == model:
                return card
        raise NotFoundError(f"The model `{model}` does not exist.", param="model", code="model_not_found")

    # -- generation ---------------------------------------------------------------------------------
    def _compiler(self):
        from budwood.engine.grammar import GrammarCompiler

        if self._grammar is None:
            e = self.engine
            self._grammar = GrammarCompiler(e.tokenizer, e.runner.vocab_size, e.stop_ids)
        return self._grammar

    async def grammar(self, response_format: dict | None):
        """The compiled grammar for a response_format (None for free text)."""
        if not response_format or response_format.get("type") == "text":
            return None
        from budwood.engine.grammar import GrammarError

        try:
            return await asyncio.to_thread(self._compiler().compile, response_format)
        except GrammarError as e:
            raise BudwoodError(str(e), param="response_format") from None

    async def tool_grammar(self, lark: str):
        """The compiled grammar that forces a tool call (serve/tools.py ToolRequest.grammar)."""
        from budwood.engine.grammar import GrammarError

        try:
            return await asyncio.to_thread(self._compiler().compile_lark, lark, "tools")
        except GrammarError as e:
            raise BudwoodError(str(e), param="tools") from None

    def sampling_params(self, req, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
                        grammar, cache_salt: str | None) -> SamplingParams:
        """The engine's SamplingParams for a chat or completion request; features budwood does not
        implement are refused by name rather than ignored (chat's, such as tools: serve/chat.py)."""
        if getattr(req, "suffix", None):
            raise BudwoodError("suffix is not supported", param="suffix")
        if getattr(req, "best_of", None) not in (None, req.n):
            raise BudwoodError("best_of other than n is not supported", param="best_of")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            bias = {int(k): float(v) for k, v in (req.logit_bias or {}).items()}
        except ValueError:
            raise BudwoodError("logit_bias keys must be token ids", param="logit_bias") from None
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k, min_p=req.min_p,
                              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                              repetition_penalty=req.repetition_penalty, logit_bias=bias, stop=stop,
                              stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, n=req.n, seed=req.seed,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs, grammar=grammar,
                              cache_salt=cache_salt)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, adapter, logprobs_from: int = 1
                       ) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one prompt; its errors are answered by their kinds (a bad parameter
        400, a failed step 500), except a full queue: OpenAI's clients expect 429 and retry it."""
        try:
            async for out in self.async_engine.submit(prompt_ids, params, adapter, logprobs_from):
                yield out
        except QueueFull as e:
            raise LimitExceeded(str(e), code="rate_limit_exceeded") from None

    # -- calibrated abstention ------------------------------------------------------------------------
    async def abstention_policy(self, adapter, asked: bool | None) -> AbstentionPolicy | None:
        """The policy a request gets from the request field `calibrated_abstention`: true needs the model's
        calibration.json (else a 400 naming the field), null follows the calibration's `default`, false
        none. A calibration fitted on other weights than the adapter's now is refused either way."""
        if asked is False or (adapter is None and asked is None):
            return None
        calibration = await asyncio.to_thread(self._calibration, adapter.path) if adapter is not None else None
        if calibration is None:
            if asked:
                raise BudwoodError("calibrated_abstention: this model has no calibration (calibration.json in its "
                                   "adapter folder, made by `budwood calibrate`)", param="calibrated_abstention",
                                   code="calibration_not_found")
            return None
        return calibration.policy() if asked or calibration.default else None

    def _calibration(self, path: Path) -> Calibration | None:
        """The adapter folder's calibration, checked against its weights once per change of either file."""
        cal = path / CALIBRATION_FILE
        stamp = (cal.stat().st_mtime_ns if cal.exists() else None, file_stamp(path))
        hit = self._calibrations.get(path)
        if hit is None or hit[0] != stamp:
            found = load_calibration(path, adapter_fingerprint(path)) if stamp[0] is not None else None
            self._calibrations[path] = hit = (stamp, found)
        return hit[1]

    async def generate_held(self, prompt_ids: list[int], params: SamplingParams, adapter,
                            policy: AbstentionPolicy | None, verdicts: dict[int, AbstentionVerdict]
                            ) -> AsyncIterator[RequestOutput]:
        """`generate` under calibrated abstention: the whole answer first (a stream gets it in one piece),
        then each choice below the threshold replaced by the abstention text (its logprobs emptied: it
        was not sampled; finish_reason stop). `verdicts` gets each choice's AbstentionVerdict by index."""
        if policy is None:
            async for out in self.generate(prompt_ids, params, adapter):
                yield out
            return
        final = None
        async for out in self.generate(prompt_ids, params, adapter):
            final = merge_outputs(final, out)
        for c, confidence in zip(final.choices, await self._confidences(prompt_ids, params, adapter, final, policy)):
            abstained = policy.abstains(confidence)
            verdicts[c.index] = AbstentionVerdict(abstained=abstained, confidence=confidence,
                                                  threshold=policy.threshold, score=str(policy.score))
            if abstained:
                c.text, c.token_ids, c.logprobs, c.finish_reason = policy.text, [], [], FinishReason.STOP
        yield final

    async def _confidences(self, prompt_ids: list[int], params: SamplingParams, adapter, final: RequestOutput,
                           policy: AbstentionPolicy) -> list[float]:
        """Each choice's confidence as budwood eval scores it (eval/confidence.py)."""
        if policy.score is not ScoreKind.AGREEMENT:
            return [logprob_confidence([lp.logprob for lp in c.logprobs], policy.score) for c in final.choices]

        async def sample(seed: int) -> str:
            drawn = SamplingParams(max_tokens=params.max_tokens, temperature=AGREEMENT_TEMPERATURE, seed=seed,
                                   cache_salt=params.cache_salt)
            merged = None
            async for out in self.generate(prompt_ids, drawn, adapter):
                merged = merge_outputs(merged, out)
            return merged.choices[0].text

        samples = await asyncio.gather(*(sample(s) for s in agreement_seeds(policy.samples)))
        return [agreement(c.text, list(samples)) for c in final.choices]

    @staticmethod
    def internal_logprobs(asked: int | None, policy: AbstentionPolicy | None) -> int | None:
        """The logprobs to ask the engine for: the client's, or none but the sampled token's where the policy
        scores them (the client sees only what it asked for)."""
        return 0 if asked is None and policy is not None and policy.score.needs_logprobs else asked

    async def collect(self, request: Request, outputs: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
        """Drain a generation, aborting it if the client goes away."""
        collected: list[RequestOutput] = []

        async def drain():
            async for o in outputs:
                collected.append(o)

        task = asyncio.create_task(drain())
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await outputs.aclose()
                raise BudwoodError("client disconnected", kind=ErrorKind.CANCELLED)
        task.result()
        return collected

    def token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    def chat_logprobs(self, lps: list[TokenLogprob]) -> list[dict]:
        """OpenAI's chat `logprobs.content`: each token with its bytes and its top alternatives."""
        return [{"token": (t := self.token_text(lp.token_id)), "logprob": lp.logprob, "bytes": list(t.encode()),
                 "top_logprobs": [{"token": (tt := self.token_text(i)), "logprob": v, "bytes": list(tt.encode())}
                                  for i, v in lp.top]} for lp in lps]

    def completion_logprobs(self, lps: list[TokenLogprob | None], token_ids: list[int], offset0: int) -> dict:
        """OpenAI's legacy completion logprobs; `offset0` is where the first token starts in the text."""
        tokens, token_lps, tops, offsets, at = [], [], [], [], offset0
        for tid, lp in zip(token_ids, lps):
            t = self.token_text(tid)
            tokens.append(t)
            offsets.append(at)
            at += len(t)
            token_lps.append(None if lp is None else lp.logprob)
            tops.append(None if lp is None else {self.token_text(i): v for i, v in lp.top})
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    async def create_chat_completion(self, body: ChatCompletionRequest, caller: Caller, request: Request):
        """/v1/chat/completions: a ChatCompletionResponse, or an SSE stream of chunks (serve/chat.py)."""
        return await chat.create_chat_completion(self, body, caller, request)

    async def create_completion(self, body: CompletionRequest, caller: Caller, request: Request):
        """/v1/completions: a CompletionResponse, or an SSE stream of chunks (serve/completions.py)."""
        return await completions.create_completion(self, body, caller, request)

    # -- adapters at run time -----------------------------------------------------------------------
    async def load_adapter(self, body: LoadAdapterRequest) -> None:
        """vLLM's /v1/load_lora_adapter: a folder inside the server's adapters folder, under a new name."""
        e = self.engine
        if not e.config.adapters:
            raise BudwoodError("runtime adapter loading needs the server started with --adapters DIR; "
                               "adapter paths must lie inside it", param="lora_path")
        root = Path(e.config.adapters).expanduser().resolve()
        if "\x00" in body.lora_path or "\x00" in body.lora_name:  # no file name holds one; os calls raise on it
            raise BudwoodError("lora_path and lora_name must not contain a NUL character",
                               param="lora_path" if "\x00" in body.lora_path else "lora_name")
        try:
            path = (root / body.lora_path).resolve()
        except (OSError, ValueError, RuntimeError) as err:  # a path the OS cannot resolve (too long, a loop)
            raise BudwoodError(f"lora_path {body.lora_path!r}: {err}", param="lora_path") from None
        if root != path and root not in path.parents:
            raise BudwoodError(f"lora_path {body.lora_path!r} is outside the adapters folder {root}",
                               param="lora_path")
        if body.lora_name in e.base_names:
            raise BudwoodError(f"{body.lora_name!r} is the base model's name", param="lora_name")
        if not ADAPTER_NAME.match(body.lora_name) or body.lora_name.startswith("ft:"):
            raise BudwoodError(f"lora_name {body.lora_name!r}: use letters, digits and . _ - : @ / (names starting "
                               "'ft:' are the fine-tuning service's)", param="lora_name")
        try:
            await asyncio.to_thread(e.register_adapter, body.lora_name, path)
        except AdapterError as err:
            raise BudwoodError(str(err), param="lora_path", code="invalid_adapter") from None

    def unload_adapter(self, name: str) -> None:
        try:
            self.engine.unregister_adapter(name)
        except AdapterError as err:
            raise NotFoundError(str(err), param="lora_name", code="model_not_found") from None

    # -- operations ---------------------------------------------------------------------------------
    def health(self) -> Health:
        return Health(model=self.engine.base_name, in_flight=self.async_engine.in_flight)

    def render_metrics(self, authorization: str) -> tuple[bytes, str]:
        """Prometheus text, to whoever holds the metrics token when the server has one."""
        if self.metrics_token == "":
            raise ForbiddenError("/metrics is off on this server: give it a metrics token to turn it on")
        if self.metrics_token is not None:
            if not hmac.compare_digest(authorization.encode(), f"Bearer {self.metrics_token}".encode()):
                raise BudwoodError("/metrics needs the server's metrics token (Authorization: Bearer TOKEN)",
                                   code="invalid_api_key", kind=ErrorKind.UNAUTHENTICATED)
        return self.metrics.render()


def get_serving(request: Request) -> OpenAIServing:
    """Dependency: the app's OpenAIServing, built by its lifespan."""
    return request.app.state.openai_serving


ServingDep = Annotated[OpenAIServing, Depends(get_serving)]
