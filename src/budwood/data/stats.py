"""Token statistics of a data set: what `budwood data check` shows before anyone spends compute."""
from __future__ import annotations

from dataclasses import dataclass

from budwood.data.formats import Conversation, Issue, PreferencePair
from budwood.data.template import IGNORE, Encoded, encode_conversations, encode_pairs


@dataclass
class TokenStats:
    examples: int  # conversations, or preference pairs (their lengths count both sequences)
    total_tokens: int  # = tokens per epoch
    trained_tokens: int
    min_len: int
    median_len: int
    p95_len: int
    max_len: int
    truncated: int
    histogram: list[tuple[int, int, int]]  # (low, high, count), power-of-two buckets


@dataclass
class ToolStats:
    """How much of a data set teaches tool use: shown by `budwood data check` so a file whose calls were lost
    (or never there) is noticed before training."""

    with_tools: int  # examples that declare tools
    with_calls: int  # examples with at least one assistant tool call
    calls: int
    results: int  # tool messages
    functions: int  # distinct functions called


def tool_stats(examples: list[Conversation] | list[PreferencePair]) -> ToolStats:
    convs = [e for e in examples if isinstance(e, Conversation)]  # preference data carries no tools
    calls = [c for conv in convs for m in conv.messages for c in m.tool_calls or []]
    return ToolStats(with_tools=sum(1 for c in convs if c.tools),
                     with_calls=sum(1 for c in convs if any(m.tool_calls for m in c.messages)),
                     calls=len(calls), results=sum(1 for c in convs for m in c.messages if m.role == "tool"),
                     functions=len({c.function.name for c in calls}))


def token_stats(examples: list[Conversation] | list[PreferencePair], tokenizer, max_seq_len: int,
                issues: list[Issue]) -> TokenStats:
    before = len(issues)
    if examples and isinstance(examples[0], PreferencePair):
        pairs = encode_pairs(tokenizer, examples, max_seq_len, issues)
        sequences: list[list[Encoded]] = [[p.chosen, p.rejected] for p in pairs]
    else:
        sequences = [[e] for e in encode_conversations(tokenizer, examples, max_seq_len, issues)]
    truncated = sum(1 for i in issues[before:] if i.code == "too_long")
    lengths = sorted(sum(len(e) for e in seqs) for seqs in sequences) or [0]
    buckets: dict[int, int] = {}
    for n in lengths:
        low = 1 << max(0, n.bit_length() - 1)
        buckets[low] = buckets.get(low, 0) + 1
    return TokenStats(
        examples=len(sequences), total_tokens=sum(lengths),
        trained_tokens=sum(sum(1 for x in e.labels if x != IGNORE) for seqs in sequences for e in seqs),
        min_len=lengths[0], median_len=lengths[len(lengths) // 2],
        p95_len=lengths[min(len(lengths) - 1, int(len(lengths) * 0.95))], max_len=lengths[-1],
        truncated=truncated, histogram=[(lo, 2 * lo - 1, c) for lo, c in sorted(buckets.items())])
