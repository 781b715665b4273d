"""Batching: length-grouped padded rows, or packed rows with exact per-example masking.

padded: examples of similar length share a micro-batch, right-padded. With a causal mask a real
        token never attends to the padding after it, so no attention mask is needed and the fast
        causal attention kernel runs.
packed: examples are concatenated into one row; position ids restart at every example, which makes
        transformers build a block-diagonal causal mask, so attention never crosses examples.
Both are exact: an example's loss does not depend on its batch mates (tested to 1e-5 in fp32).
The plan for an epoch is a pure function of (seed, epoch), which is what makes resume exact.

Preference pairs can share their prompt (`collate_pairs(share_prompt=True)`): a pair is one segment
[chosen sequence, rejected sequence minus the prefix it shares], with an explicit attention mask in which
the rejected answer sees the shared prefix and itself, never the chosen answer, another pair or padding.
The prompt (most of a pair's tokens) then runs through the decoder once instead of twice, and each answer's
log-probabilities are those of its own separate sequence (tested to 1e-5 in fp32).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from budwood.data.template import IGNORE, Encoded, EncodedPair


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, T]
    labels: torch.Tensor  # [rows, T], IGNORE where not trained
    position_ids: torch.Tensor | None  # packed rows only
    example_index: torch.Tensor  # [rows, T] index into the epoch's examples, -1 for padding
    n_tokens: int  # real (non-padding) tokens
    # preference pairs only: the reference policy's log-probability of each sequence ([2 * pairs], chosen then
    # rejected for each pair, in the order of example_index), and its answer-token count
    reference: torch.Tensor | None = None
    # shared-prompt pairs only: which tokens each token attends to ([rows, 1, T, T] bool, True = attend); None
    # means causal within each example, which lets attention run its fast causal kernel
    attention_mask: torch.Tensor | None = None

    @property
    def n_label_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids),
                     self.example_index, self.n_tokens, move(self.reference), move(self.attention_mask))


def plan_epoch(lengths: list[int], strategy: str, batch_size: int, tokens_per_batch: int | None,
               seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches (lists of example indices) for one epoch, in training order."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    if strategy == "padded":
        mega = batch_size * 64
        for m in range(0, len(order), mega):
            group = sorted(order[m:m + mega], key=lambda i: lengths[i], reverse=True)
            cur: list[int] = []
            for i in group:
                longest = lengths[cur[0]] if cur else lengths[i]
                if cur and (len(cur) == batch_size or
                            (tokens_per_batch and longest * (len(cur) + 1) > tokens_per_batch)):
                    batches.append(cur)
                    cur = []
                cur.append(i)
            if cur:
                batches.append(cur)
    elif strategy == "packed":
        # about batch_size examples per row on average, so the schedule means the same as when padded
        capacity = max(tokens_per_batch or batch_size * math.ceil(sum(lengths) / len(lengths)), max(lengths))
        rows: list[tuple[int, list[int]]] = []  # (free tokens, examples): first-fit decreasing
        for i in sorted(order, key=lambda i: lengths[i], reverse=True):
            for r, (free, members) in enumerate(rows):
                if lengths[i] <= free:
                    members.append(i)
                    rows[r] = (free - lengths[i], members)
                    break
            else:
                rows.append((capacity - lengths[i], [i]))
        batches = [members for _, members in rows]
    else:
        raise ValueError(f"unknown batching strategy {strategy!r}")
    rng.shuffle(batches)
    return batches


def collate(examples: list[Encoded], indices: list[int], strategy: str, pad_id: int) -> Batch:
    chosen = [examples[i] for i in indices]
    if strategy == "packed":
        ids = [t for e in chosen for t in e.input_ids]
        labels, pos, owner = [], [], []
        for i, e in zip(indices, chosen, strict=True):
            labels += [IGNORE] + e.labels[1:]  # the first token is never predicted from another example
            pos += list(range(len(e)))
            owner += [i] * len(e)
        return Batch(torch.tensor([ids]), torch.tensor([labels]), torch.tensor([pos]),
                     torch.tensor([owner]), len(ids))
    width = max(len(e) for e in chosen)
    ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
    labels = torch.full((len(chosen), width), IGNORE, dtype=torch.long)
    owner = torch.full((len(chosen), width), -1, dtype=torch.long)
    for r, (i, e) in enumerate(zip(indices, chosen, strict=True)):
        ids[r, : len(e)] = torch.tensor(e.input_ids)
        labels[r, : len(e)] = torch.tensor(e.labels)
        owner[r, : len(e)] = i
    return Batch(ids, labels, None, owner, sum(len(e) for e in chosen))


def shared_prefix(pair: EncodedPair) -> int:
    """How many leading tokens the pair's rejected sequence can take from its chosen one: k tokens that are
    identical on both sides, such that none of the rejected tokens 1..k is trained on (the rejected segment then
    starts at token k, whose hidden state predicts the first answer token, and sees the chosen segment's first k
    tokens as its past). Usually the prompt minus its last token; less when the tokenizer merged text across the
    end of the prompt differently on the two sides, and 0 (two separate sequences) when the first tokens differ."""
    a, b = pair.chosen.input_ids, pair.rejected.input_ids
    first_label = next((t for t in range(1, len(b)) if pair.rejected.labels[t] != IGNORE), len(b))
    k = 0
    while k < min(len(a), len(b), first_label - 1) and a[k] == b[k]:
        k += 1
    return k


def pair_length(pair: EncodedPair, share_prompt: bool) -> int:
    """The tokens a pair puts through the decoder: what planning packs and the run counts."""
    return len(pair) - (shared_prefix(pair) if share_prompt else 0)


def collate_pairs(pairs: list[EncodedPair], indices: list[int], strategy: str, pad_id: int,
                  share_prompt: bool = False) -> Batch:
    """The pairs' sequences side by side (rows when padded, segments when packed), numbered in the batch:
    pair k's preferred answer is example 2k, its non-preferred one 2k + 1. The reference log-probabilities
    come along once they are known. With `share_prompt`, each pair is one segment that runs its prompt once
    (see the module's docstring); the numbering is the same."""
    if share_prompt:
        batch = _collate_shared(pairs, indices, strategy, pad_id)
    else:
        flat = [side for i in indices for side in (pairs[i].chosen, pairs[i].rejected)]
        batch = collate(flat, list(range(len(flat))), strategy, pad_id)
    if all(pairs[i].reference is not None for i in indices):
        batch.reference = torch.tensor([x for i in indices for x in pairs[i].reference], dtype=torch.float32)
    return batch


def _collate_shared(pairs: list[EncodedPair], indices: list[int], strategy: str, pad_id: int) -> Batch:
    """One segment per pair: the chosen sequence (positions 0..), then the rejected one from token k on
    (positions k..), k = shared_prefix. Rows: one per pair when padded, one in all when packed."""
    units = []  # per pair: ids, labels, positions, owner, segment (0 chosen, 1 rejected), k
    for j, i in enumerate(indices):
        c, r = pairs[i].chosen, pairs[i].rejected
        k = shared_prefix(pairs[i])
        units.append((c.input_ids + r.input_ids[k:],
                      [IGNORE] + c.labels[1:] + [IGNORE] + r.labels[k + 1:],  # a segment's first token: no label
                      list(range(len(c))) + list(range(k, len(r))),
                      [2 * j] * len(c) + [2 * j + 1] * (len(r) - k),
                      [0] * len(c) + [1] * (len(r) - k), k))
    rows = [units] if strategy == "packed" else [[u] for u in units]
    if strategy not in ("packed", "padded"):
        raise ValueError(f"unknown batching strategy {strategy!r}")
    width = max(sum(len(u[0]) for u in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)  # unit * 2 + side within the row; -1 padding
    sees = torch.zeros((len(rows), width), dtype=torch.long)  # rejected tokens: how many chosen tokens they see
    for r, row in enumerate(rows):
        at = 0
        for u, (i_, l_, p_, o_, s_, k) in enumerate(row):
            n = len(i_)
            ids[r, at:at + n], labels[r, at:at + n] = torch.tensor(i_), torch.tensor(l_)
            pos[r, at:at + n], owner[r, at:at + n] = torch.tensor(p_), torch.tensor(o_)
            seg[r, at:at + n] = 2 * u + torch.tensor(s_)
            sees[r, at:at + n] = k * torch.tensor(s_)
            at += n
    # token q attends to key t (t <= q): same segment, or q rejected and t among its pair's first k chosen tokens
    q_seg, t_seg = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (q_seg == t_seg) & (q_seg >= 0)
    prompt = (t_seg == q_seg - 1) & (q_seg % 2 == 1) & (pos[:, None, :] < sees[:, :, None])
    mask = (same | prompt) & causal
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no all-masked row (nan) anywhere
    return Batch(ids, labels, pos, owner, int((owner >= 0).sum()), attention_mask=mask[:, None])
