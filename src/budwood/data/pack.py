"""Batching: length-grouped padded rows, or packed rows with exact per-example masking.

padded: examples of similar length share a micro-batch, right-padded. With a causal mask a real
        token never attends to the padding after it, so no attention mask is needed and the fast
        causal attention kernel runs.
packed: examples are concatenated into one row; position ids restart at every example, which makes
        transformers build a block-diagonal causal mask, so attention never crosses examples.
Both are exact: an example's loss does not depend on its batch mates (tested to 1e-5 in fp32).
The plan for an epoch is a pure function of (seed, epoch), which is what makes resume exact.
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

    @property
    def n_label_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids),
                     self.example_index, self.n_tokens, move(self.reference))


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


def collate_pairs(pairs: list[EncodedPair], indices: list[int], strategy: str, pad_id: int) -> Batch:
    """The pairs' sequences side by side (rows when padded, segments when packed), numbered in the batch:
    pair k's preferred answer is example 2k, its non-preferred one 2k + 1. The reference log-probabilities
    come along once they are known."""
    flat = [side for i in indices for side in (pairs[i].chosen, pairs[i].rejected)]
    batch = collate(flat, list(range(len(flat))), strategy, pad_id)
    if all(pairs[i].reference is not None for i in indices):
        batch.reference = torch.tensor([x for i in indices for x in pairs[i].reference], dtype=torch.float32)
    return batch
