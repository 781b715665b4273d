"""From sampled tokens to what a caller sees: incremental text, stop strings and streaming deltas.

The scheduler and sampler deal in token ids; this module turns one choice's ids into text as they
arrive (vLLM's `IncrementalDetokenizer`), ends the choice at a stop string, and hands out only what
is new since the last output. Text that might be the start of a stop string is held back until the
next token settles it, so a streaming client never sees characters that are later cut.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from budwood.engine.sampling import TokenLogprob

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class FinishReason(StrEnum):
    """Why a choice ended; the values are OpenAI's `finish_reason` strings, so they serialise as such."""

    STOP = "stop"  # an end-of-turn token, a stop token id, a stop string, or a completed grammar
    LENGTH = "length"  # max_tokens (or the context) reached
    ABORT = "abort"  # the caller went away; never reported, the request is dropped


@dataclass
class ChoiceDelta:
    """What one choice gained since its last output: text, token ids, their logprobs, and how it ended."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: FinishReason | None


@dataclass
class RequestOutput:
    """One request's progress after a step; `finished` once every choice has ended.

    A streaming caller forwards each output as it comes; a caller who wants the whole answer folds
    them with `merge_outputs`. Token counts are totals so far, not deltas."""

    request_id: str
    prompt_ids: list[int]
    choices: list[ChoiceDelta]
    finished: bool
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None = None


def merge_outputs(acc: RequestOutput | None, new: RequestOutput) -> RequestOutput:
    """Fold a later output into the accumulated one (`acc` is updated; None starts a new one)."""
    if acc is None:
        acc = RequestOutput(new.request_id, new.prompt_ids, [], False, new.prompt_tokens, 0)
    by_index = {c.index: c for c in acc.choices}
    for c in new.choices:
        old = by_index.get(c.index)
        if old is None:
            by_index[c.index] = ChoiceDelta(c.index, c.text, list(c.token_ids), list(c.logprobs), c.finish_reason)
        else:
            old.text += c.text
            old.token_ids += c.token_ids
            old.logprobs += c.logprobs
            old.finish_reason = c.finish_reason or old.finish_reason
    acc.choices = [by_index[i] for i in sorted(by_index)]
    acc.finished, acc.completion_tokens = new.finished, new.completion_tokens
    acc.prompt_logprobs = new.prompt_logprobs if new.prompt_logprobs is not None else acc.prompt_logprobs
    return acc


class IncrementalDetokenizer:
    """One choice's text, decoded a token at a time, cut at its stop strings, sent in deltas.

    Decoding re-reads a few tokens before the new ones (`prefix_offset`) because tokenizers such as
    SentencePiece decide a token's leading space from its neighbours, and waits while the text ends
    in U+FFFD so half of a multi-byte character is never emitted.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = ""
        # decode the first tokens with a little prompt before them, or SentencePiece drops their space
        self.prefix_offset, self.read_offset = max(len(prompt_ids) - 5, 0), len(prompt_ids)
        self.token_ends: list[int] = []  # len(text) after each output token
        self.sent_chars = 0
        self.sent_tokens = 0
        self.finish_sent = False

    def add_stop_token(self) -> None:
        """A stop token ends the choice and adds no text."""
        self.token_ends.append(len(self.text))

    def add_token(self, token_ids: list[int]) -> bool:
        """Decode the newest of `token_ids` (prompt and output so far). True when a stop string now
        appears in the text; the text is then cut before it."""
        before = len(self.text)
        prefix = self.tokenizer.decode(token_ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        new = self.tokenizer.decode(token_ids[self.prefix_offset:], skip_special_tokens=True)
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self.text += new[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        self.token_ends.append(len(self.text))
        # a stop string may straddle the old text and the new: search from len(stop) - 1 before it
        found = [i for s in self.stop if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if found:
            self.text = self.text[:min(found)]
            return True
        return False

    def delta(self, index: int, output_ids: list[int], logprobs: list[TokenLogprob],
              finish_reason: FinishReason | None) -> ChoiceDelta | None:
        """What is new since the last call, or None; a finished choice's last delta comes exactly once."""
        if self.finish_sent:
            return None
        if finish_reason is not None:
            upto_chars, upto_tokens = len(self.text), len(output_ids)
        else:
            upto_chars = len(self.text) - self._held_back()
            # the tokens whose text is all out; token_ends only grows while the choice runs
            upto_tokens = bisect_right(self.token_ends, upto_chars)
        if upto_chars <= self.sent_chars and upto_tokens <= self.sent_tokens and finish_reason is None:
            return None
        out = ChoiceDelta(index, self.text[self.sent_chars:upto_chars], output_ids[self.sent_tokens:upto_tokens],
                          logprobs[self.sent_tokens:upto_tokens], finish_reason)
        self.sent_chars, self.sent_tokens, self.finish_sent = upto_chars, upto_tokens, finish_reason is not None
        return out

    def _held_back(self) -> int:
        """Characters at the end of the text that may be the start of a stop string: the longest suffix
        of the text that is a proper prefix of one. Only the last len(stop) - 1 characters are looked at,
        and only where the stop's first character occurs, so a token costs about the stops' total length
        whatever the text's (the server bounds their number and length: serve/limits.py)."""
        held = 0
        for s in self.stop:
            if len(s) < 2:
                continue
            tail = self.text[-(len(s) - 1):]
            i = tail.find(s[0])
            while 0 <= i < len(tail) - held:  # a start further right gives a shorter suffix than `held`
                if s.startswith(tail[i:]):
                    held = len(tail) - i
                    break
                i = tail.find(s[0], i + 1)
        return held
