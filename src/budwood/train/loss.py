"""What a training step minimises: the objective seam (SFT, DPO), and token losses computed only where there
are labels.

The decoder runs over every token, but the vocabulary projection and the cross-entropy run only at
positions whose next token is trained on (assistant turns, or a preference pair's answers), which saves
most of the time and memory that full-sequence logits would cost on a small model with a large vocabulary.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from budwood.config import TrainConfig
from budwood.data.pack import Batch, collate, collate_pairs, pair_length
from budwood.data.template import IGNORE, Encoded, EncodedPair


def token_losses(lm: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cross-entropy per trained token, and the example index of each ([N], [N])."""
    logits, targets, owner = trained_logits(lm, batch)
    return F.cross_entropy(logits, targets, reduction="none"), owner


def trained_logits(lm: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 logits at the trained positions, their target tokens and the example index of each ([N, V], [N], [N]).

    `lm` is a transformers causal LM (with LoRA layers injected, or not). A batch's 4D attention mask (shared-prompt
    preference pairs) is used as given (transformers does not rebuild a 4D mask); without one the decoder runs
    causally (the fast kernel), packed rows masked by their position ids.
    """
    masked = {} if batch.attention_mask is None else {"attention_mask": batch.attention_mask}
    out = lm.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **masked)
    hidden = out.last_hidden_state[:, :-1]
    targets = batch.labels[:, 1:]
    mask = targets != IGNORE
    logits = lm.get_output_embeddings()(hidden[mask]).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits, targets[mask], batch.example_index[:, 1:].to(mask.device)[mask]


def sequence_logps(lm: torch.nn.Module, batch: Batch, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of the batch's `n` sequences' summed log-probability of its trained tokens, and their number ([n], [n])."""
    losses, owner = token_losses(lm, batch)
    logps = torch.zeros(n, device=losses.device).index_add_(0, owner, -losses)
    counts = torch.zeros(n, device=losses.device).index_add_(0, owner, torch.ones_like(losses))
    return logps, counts


class Objective(Protocol):
    """The loss a recipe trains with, chosen once at setup. A step's loss is the sum of its units'
    losses divided by the step's number of units, counted before the step runs: so it is the same
    however the step is split into micro-batches or across ranks. SFT's unit is a trained token, DPO's a
    preference pair: two objectives of one recipe."""

    name: str
    columns: tuple[str, ...]  # what `losses` reports beside each unit's loss (summed, logged as step means)

    def losses(self, lm: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """fp32 [N, 1 + len(columns)]: each unit's loss (with its graph), then its detached statistics."""
        ...

    def units(self, example) -> int:
        """How many units `example` adds to a step."""
        ...

    def length(self, example) -> int:
        """The tokens `example` puts through the decoder: what batches are planned (and tokens counted) by."""
        ...

    def collate(self, examples: list, indices: list[int], batching: str, pad_id: int) -> Batch:
        """The micro-batch of these examples."""
        ...


class SFT:
    """Supervised fine-tuning: next-token cross-entropy on the assistant's tokens, and whether each token is the
    model's argmax (mean_token_accuracy, as TRL's SFTTrainer and OpenAI's fine-tuning metrics report it)."""

    name = "sft"
    columns: tuple[str, ...] = ("mean_token_accuracy",)

    def losses(self, lm: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logits, targets, _ = trained_logits(lm, batch)
        hit = (logits.detach().argmax(-1) == targets).float()
        return torch.stack([F.cross_entropy(logits, targets, reduction="none"), hit], dim=1)

    def units(self, example: Encoded) -> int:
        return sum(1 for x in example.labels[1:] if x != IGNORE)

    def length(self, example: Encoded) -> int:
        return len(example)

    def collate(self, examples: list[Encoded], indices: list[int], batching: str, pad_id: int) -> Batch:
        return collate(examples, indices, batching, pad_id)


class DPO:
    """Direct preference optimisation (Rafailov et al. 2023) on (preferred, non-preferred) answer pairs.

    margin = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)), and a pair's loss is
    -log sigmoid(beta * margin) (sigmoid) or (margin - 1/(2 beta))^2 on length-averaged log-probabilities (ipo),
    plus sft_weight times the preferred answer's mean token NLL (RPO). The reference log-probabilities come
    with the batch (computed once, before the first step, by the policy itself: LoRA starts as the identity, or
    as the frozen init_adapter), so no second model is kept. At the first step margin = 0: the sigmoid loss is
    ln 2. The statistics are TRL's DPOTrainer's, under its names, so the curves compare. With `share_prompt` a
    pair's prompt runs through the decoder once for both answers (data/pack.py), with the same log-probabilities."""

    name = "dpo"
    columns = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")

    def __init__(self, beta: float, loss_type: str = "sigmoid", sft_weight: float = 0.0, share_prompt: bool = True):
        self.beta, self.loss_type, self.sft_weight, self.share_prompt = beta, loss_type, sft_weight, share_prompt

    def units(self, example: EncodedPair) -> int:
        return 1

    def length(self, example: EncodedPair) -> int:
        return pair_length(example, self.share_prompt)

    def collate(self, examples: list[EncodedPair], indices: list[int], batching: str, pad_id: int) -> Batch:
        return collate_pairs(examples, indices, batching, pad_id, self.share_prompt)

    def losses(self, lm: torch.nn.Module, batch: Batch) -> torch.Tensor:
        if batch.reference is None:
            raise RuntimeError("DPO needs the reference log-probabilities with the batch")
        logps, counts = sequence_logps(lm, batch, batch.reference.numel())
        policy, ref = logps, batch.reference.to(logps.device)
        if self.loss_type == "ipo":
            policy, ref = policy / counts, ref / counts
        chosen, rejected = policy[0::2] - ref[0::2], policy[1::2] - ref[1::2]
        margin = chosen - rejected
        if self.loss_type == "ipo":
            loss = (margin - 1 / (2 * self.beta)) ** 2
        else:
            loss = -F.logsigmoid(self.beta * margin)
        if self.sft_weight:
            loss = loss + self.sft_weight * (-logps[0::2] / counts[0::2])
        stats = torch.stack([self.beta * chosen, self.beta * rejected, (chosen > rejected).float(),
                             self.beta * margin, logps[0::2], logps[1::2]], dim=1).detach()
        return torch.cat([loss[:, None], stats], dim=1)


class ReferenceLogps:
    """Not a training objective: each pair's two summed answer log-probabilities ([pairs, 2]), computed through
    LossModule's forward as a loss is (so a wrapper such as FSDP gathers what it shards), once, before DPO's
    first step."""

    name = "reference"
    columns: tuple[str, ...] = ()

    def losses(self, lm: torch.nn.Module, batch: Batch) -> torch.Tensor:
        n = int(batch.example_index.max()) + 1
        return sequence_logps(lm, batch, n)[0].view(-1, 2)


def objective_for(config: TrainConfig) -> Objective:
    """The objective training.method names."""
    if config.training.method == "dpo":
        d = config.training.dpo
        return DPO(d.beta, d.loss_type, d.sft_weight, d.share_prompt)
    return SFT()


class LossModule(torch.nn.Module):
    """The causal LM as a module whose forward is the objective's losses, so that the data-parallel
    wrappers see the whole computation go through their forward."""

    def __init__(self, lm: torch.nn.Module, objective: Objective):
        super().__init__()
        self.lm = lm
        self.objective = objective

    def forward(self, input_ids, labels, position_ids, example_index, reference=None, attention_mask=None
                ) -> torch.Tensor:
        return self.objective.losses(self.lm, Batch(input_ids, labels, position_ids, example_index, 0, reference,
                                                    attention_mask))

    def run(self, batch: Batch) -> torch.Tensor:
        """The losses (and statistics) of a collated batch."""
        return self(batch.input_ids, batch.labels, batch.position_ids, batch.example_index, batch.reference,
                    batch.attention_mask)
