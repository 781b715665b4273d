"""Token losses computed only where there are labels.

The decoder runs over every token, but the vocabulary projection and the cross-entropy run only at
positions whose next token is trained on (assistant turns), which saves most of the time and memory
that full-sequence logits would cost on a small model with a large vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from budwood.data.pack import Batch
from budwood.data.template import IGNORE


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
