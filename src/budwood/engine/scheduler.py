"""Continuous batching: which sequences compute which tokens in the next step.

Each step has a token budget. Sequences that are decoding go first (one token each), then prompts
fill what is left in chunks, so a long prompt is spread over several steps instead of stalling every
decoding sequence behind it. A sequence is admitted only when the KV-cache blocks for its prompt and
its whole `max_tokens` can be reserved, so a running sequence never runs out of cache midway;
prompt blocks already in the prefix cache are reused.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from budwood.engine.adapters import LoadedAdapter
from budwood.engine.cache import BlockPool, block_hashes
from budwood.engine.output import FinishReason
from budwood.engine.sampling import SamplingParams, TokenLogprob


@dataclass(eq=False)
class Sequence:
    """One choice of one request: its tokens, cache blocks and output so far (its text is the
    detokeniser's, output.py)."""
    request_id: str
    index: int
    tokens: list[int]
    prompt_len: int
    max_new: int
    params: SamplingParams
    adapter: LoadedAdapter | None
    generator: torch.Generator
    logprobs_from: int = 1  # first prompt index whose log-probability is reported (prompt_logprobs)
    after: Sequence | None = None  # admitted once this one's prompt is in the cache (shares its blocks)
    matcher: object | None = None
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    hashes: list[bytes] = field(default_factory=list)
    registered: int = 0
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    uid: int = -1  # set by Scheduler.add: stable across steps, unlike the position in the batch

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def prefilled(self) -> bool:
        return self.computed >= self.prompt_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Scheduled:
    seq: Sequence
    n: int
    logits_from: int  # offset within this chunk of the first position whose logits are needed


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch_tokens: int = 512, max_num_seqs: int = 64):
        self.pool = pool
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache instead of computed
        self._uids = itertools.count()

    def blocks_needed(self, seq: Sequence) -> int:
        return -(-(seq.prompt_len + seq.max_new) // self.pool.block_size)

    def add(self, seq: Sequence) -> None:
        seq.uid = next(self._uids)
        key = seq.adapter.key if seq.adapter is not None else ""
        if seq.params.cache_salt:  # vLLM's cache_salt: a tenant's prompts never hit another tenant's blocks
            key += "\x00salt:" + seq.params.cache_salt
        seq.hashes = block_hashes(seq.tokens[:seq.prompt_len], self.pool.block_size, key)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence and give its cache blocks back (a full prompt block stays in the prefix cache)."""
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.pool.release(seq.blocks)
            seq.blocks = []
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> list[Scheduled]:
        budget, out = self.max_batch_tokens, []
        for seq in self.running:  # decoding first: one token each
            if seq.prefilled and budget > 0:
                out.append(self._chunk(seq, 1))
                budget -= 1
        for seq in self.running:  # then prompts already under way
            if not seq.prefilled and budget > 0:
                n = min(seq.prompt_len - seq.computed, budget)
                out.append(self._chunk(seq, n))
                budget -= n
        deferred = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if seq.after is not None and not (seq.after.prefilled or seq.after.finished):
                deferred.append(seq)
                continue
            if not self._admit(seq):
                self.waiting.appendleft(seq)
                break
            self.running.append(seq)
            n = min(seq.prompt_len - seq.computed, budget)
            out.append(self._chunk(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        return out

    def _admit(self, seq: Sequence) -> bool:
        bs = self.pool.block_size
        # keep at least the last prompt token (and every token whose logprob is wanted) to compute
        cacheable = min(seq.prompt_len - 1, seq.logprobs_from - 1 if seq.params.prompt_logprobs is not None
                        else seq.prompt_len - 1) // bs
        hit = self.pool.cached_prefix(seq.hashes[:max(cacheable, 0)])
        need = self.blocks_needed(seq) - len(hit)
        if need > self.pool.num_free() - sum(1 for b in hit if self.pool.refcount[b] == 0):
            return False
        self.pool.claim(hit)
        seq.blocks = hit + self.pool.allocate(need)
        seq.computed, seq.registered = len(hit) * bs, len(hit)
        self.cached_tokens += seq.computed
        return True

    def _chunk(self, seq: Sequence, n: int) -> Scheduled:
        end = seq.computed + n
        if seq.params.prompt_logprobs is not None and not seq.prefilled:
            first = max(seq.logprobs_from - 1 - seq.computed, 0)
            return Scheduled(seq, n, min(first, n - 1) if end >= seq.prompt_len else min(first, n))
        return Scheduled(seq, n, n - 1 if end >= len(seq.tokens) else n)

    def computed(self, seq: Sequence, n: int) -> None:
        """Record a step's work; name prompt blocks that are now full so later requests reuse them."""
        seq.computed += n
        bs = self.pool.block_size
        full = min(seq.computed, seq.prompt_len) // bs
        for i in range(seq.registered, full):
            self.pool.register(seq.blocks[i], seq.hashes[i])
        seq.registered = max(seq.registered, full)
