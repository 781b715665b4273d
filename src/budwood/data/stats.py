"""Token statistics of a data set: what `budwood data check` shows before anyone spends compute."""
from __future__ import annotations

from dataclasses import dataclass

from budwood.data.formats import Conversation, Issue
from budwood.data.template import IGNORE, encode_conversations


@dataclass
class TokenStats:
    examples: int
    total_tokens: int  # = tokens per epoch
    trained_tokens: int
    min_len: int
    median_len: int
    p95_len: int
    max_len: int
    truncated: int
    histogram: list[tuple[int, int, int]]  # (low, high, count), power-of-two buckets


def token_stats(conversations: list[Conversation], tokenizer, max_seq_len: int,
                issues: list[Issue]) -> TokenStats:
    before = len(issues)
    encoded = encode_conversations(tokenizer, conversations, max_seq_len, issues)
    truncated = sum(1 for i in issues[before:] if i.code == "too_long")
    lengths = sorted(len(e) for e in encoded) or [0]
    buckets: dict[int, int] = {}
    for n in lengths:
        low = 1 << max(0, n.bit_length() - 1)
        buckets[low] = buckets.get(low, 0) + 1
    return TokenStats(
        examples=len(encoded), total_tokens=sum(lengths),
        trained_tokens=sum(sum(1 for x in e.labels if x != IGNORE) for e in encoded),
        min_len=lengths[0], median_len=lengths[len(lengths) // 2],
        p95_len=lengths[min(len(lengths) - 1, int(len(lengths) * 0.95))], max_len=lengths[-1],
        truncated=truncated, histogram=[(lo, 2 * lo - 1, c) for lo, c in sorted(buckets.items())])
