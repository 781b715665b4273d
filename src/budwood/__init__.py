"""budwood: grow, prove, document, trade and serve LoRA domain adapters on open models.

The public verbs are imported lazily so that `budwood --help` does not import torch.
"""
from __future__ import annotations

import importlib
import os

# MKL may otherwise pick fewer threads for a matmul when the machine is busy, which changes how fp32
# sums are split and so the last bits of a result: the engine's batch invariance (and repeatable
# evaluations) need the same split every time. Read by MKL when torch loads it, so set before that.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

__version__ = "0.1.0"
_VERBS = {"train": "budwood.train.recipe", "load_base": "budwood.models.load",
          "read_dataset": "budwood.data.formats", "TrainConfig": "budwood.config",
          "run_eval": "budwood.eval.run", "render_card": "budwood.card.render", "sign": "budwood.card.attest",
          "verify": "budwood.card.attest", "open_registry": "budwood.registry", "publish": "budwood.registry",
          "create_app": "budwood.serve.app", "merge_adapters": "budwood.merge.merge",
          "compose": "budwood.merge.compose", "BudwoodError": "budwood.errors"}
__all__ = list(_VERBS)


def __getattr__(name: str):
    if name not in _VERBS:
        raise AttributeError(f"module 'budwood' has no attribute {name!r}")
    return getattr(importlib.import_module(_VERBS[name]), name)
