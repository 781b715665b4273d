"""What a training step minimises: the objective seam, and token losses computed only where there are labels.

The decoder runs over every token, but the vocabulary projection and the cross-entropy run only at
positions whose next token is trained on (assistant turns), which saves most of the time and memory
that full-sequence logits would cost on a small model with a large vocabulary.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from budwood.data.pack import Batch
from budwood.data.template import IGNORE, Encoded


def token_losses(lm: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cross-entropy per trained token, and the example index of each ([N], [N]).

    `lm` is a transformers causal LM (with LoRA layers injected, or not).
    """
    out = lm.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    hidden = out.last_hidden_state[:, :-1]
    targets = batch.labels[:, 1:]
    mask = targets != IGNORE
    logits = lm.get_output_embeddings()(hidden[mask]).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    losses = F.cross_entropy(logits, targets[mask], reduction="none")
    return losses, batch.example_index[:, 1:].to(mask.device)[mask]


class Objective(Protocol):
    """The loss a recipe trains with, chosen once at setup. A step's loss is the sum of its units'
    losses divided by the step's number of units, counted before the step runs: so it is the same
    however the step is split into micro-batches or across ranks. SFT's unit is a trained token; a
    preference objective (DPO) would be a second Objective whose unit is a pair, not a second recipe."""

    name: str

    def losses(self, lm: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """fp32 loss of each unit in `batch` ([N])."""
        ...

    def units(self, example: Encoded) -> int:
        """How many units `example` adds to a step."""
        ...


class SFT:
    """Supervised fine-tuning: next-token cross-entropy on the assistant's tokens."""

    name = "sft"

    def losses(self, lm: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return token_losses(lm, batch)[0]

    def units(self, example: Encoded) -> int:
        return sum(1 for x in example.labels[1:] if x != IGNORE)


class LossModule(torch.nn.Module):
    """The causal LM as a module whose forward is the objective's losses, so that the data-parallel
    wrappers see the whole computation go through their forward."""

    def __init__(self, lm: torch.nn.Module, objective: Objective):
        super().__init__()
        self.lm = lm
        self.objective = objective

    def forward(self, input_ids, labels, position_ids, example_index) -> torch.Tensor:
        return self.objective.losses(self.lm, Batch(input_ids, labels, position_ids, example_index, 0))

    def run(self, batch: Batch) -> torch.Tensor:
        """The losses of a collated batch."""
        return self(batch.input_ids, batch.labels, batch.position_ids, batch.example_index)
