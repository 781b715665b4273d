"""The optimizer a run asks for (`training.optimizer`), over the adapter's trainable parameters.

torch's AdamW (fused on CPU and CUDA) and SGD; transformers' Adafactor, at the configured learning rate (no
relative step: the scheduler owns the rate); bitsandbytes' 8-bit AdamW, plain or paged, which exists for CUDA
only, so elsewhere it is refused by name rather than replaced.
"""
from __future__ import annotations

import torch

from budwood.errors import ConfigError


def make_optimizer(t, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """`t` is the run's TrainingConfig."""
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay,
                                 betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                                 fused=device.type in ("cuda", "cpu"))
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.learning_rate, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=t.learning_rate, weight_decay=t.weight_decay, relative_step=False,
                         scale_parameter=False, warmup_init=False)
    if device.type != "cuda":
        raise ConfigError(f"training.optimizer {t.optimizer}: bitsandbytes' 8-bit optimizers run on CUDA only, and "
                          f"this run is on {device.type}; use adamw (or train on a GPU)")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"training.optimizer {t.optimizer} needs bitsandbytes: pip install bitsandbytes") from None
    cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=t.learning_rate, weight_decay=t.weight_decay, betas=(t.adam_beta1, t.adam_beta2),
               eps=t.adam_epsilon)
