"""Sampling parameters and the sampler: penalties, grammar masks, greedy or seeded sampling, logprobs.

Each row is sampled on its own with its own random stream, so a seeded request draws the same
numbers whatever else is in the batch: a seed fixes the tokens (with batch-invariant logits, see
runner.py). Sampling uses the exponential race (argmax of p / Exp(1) noise), which draws exactly
one vector of noise per token, so the stream never drifts with top-k or top-p settings.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from budwood.errors import BudwoodError

MAX_TOP_LOGPROBS = 20


class ParamError(BudwoodError):
    """A sampling parameter out of range; `param` names it as the OpenAI API would."""

    def __init__(self, param: str, message: str):
        super().__init__(message, param=param)


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None: up to the context length
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the sampled token's plus the top k
    prompt_logprobs: int | None = None  # the same for prompt tokens (completions `echo`)
    grammar: object | None = None  # a compiled grammar from engine.grammar
    cache_salt: str | None = None  # prefix-cache blocks are shared only between requests with the same salt

    def __post_init__(self):
        checks = [
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 0, "must be >= 0"),
            ("temperature", 0 <= self.temperature <= 2, "must be between 0 and 2"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "must be -1, 0 (off) or a positive count"),
            ("min_p", 0 <= self.min_p <= 1, "must be between 0 and 1"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be between -2 and 2"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be between -2 and 2"),
            ("repetition_penalty", 0 < self.repetition_penalty <= 2, "must be in (0, 2]"),
            ("n", 1 <= self.n <= 128, "must be between 1 and 128"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"must be between 0 and {MAX_TOP_LOGPROBS}"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
             f"must be between 0 and {MAX_TOP_LOGPROBS}"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("logit_bias", all(-100 <= v <= 100 for v in self.logit_bias.values()),
             "values must be between -100 and 100"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ParamError(name, f"{name} {msg}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first

    @property
    def is_top(self) -> bool:
        """The token was the most likely one (greedy decoding would have picked it)."""
        return bool(self.top) and self.logprob >= self.top[0][1]


def top_logprobs(logprobs: torch.Tensor, token_ids: list[int], k: int) -> list[TokenLogprob]:
    """Rows of log-probabilities -> the chosen token's value and the k best, per row."""
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logprobs.device)[:, None])[:, 0].tolist()
    if k:
        vals, ids = logprobs.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in token_ids]
    return [TokenLogprob(t, c, top) for t, c, top in zip(token_ids, chosen, tops)]


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def sample_row(logits: torch.Tensor, params: SamplingParams, output_ids: list[int], prompt_ids: list[int],
               generator: torch.Generator, allowed: torch.Tensor | None, stop_ids: list[int]) -> int:
    """One next token from one row of fp32 logits [V]; pure function of its inputs and the generator."""
    logits = logits.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), device=logits.device)
    if params.repetition_penalty != 1.0:  # as in HF and vLLM: over prompt and output tokens
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=logits.device, dtype=torch.long)
        if len(seen):
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):  # OpenAI: over output tokens
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.shape[0]).float()
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    if params.ignore_eos and stop_ids and (allowed is None or not bool(allowed[stop_ids].all())):
        # (once a grammar allows only the end, ending is the only valid move)
        logits[torch.tensor(stop_ids, device=logits.device)] = float("-inf")
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[0]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = (sorted_p.cumsum(0) - sorted_p) > params.top_p  # keeps the token that crosses top_p
        drop[0] = False
        probs = probs.scatter(0, order[drop], 0.0)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())
