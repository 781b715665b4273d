"""Training: the LoRA recipe and what it is made of.

recipe.py (read first: setup -> train -> checkpoint -> finish) · state.py (RunState, StopReason) ·
distributed.py (Strategy: Single, DDP, FSDP) · loss.py (Objective: SFT) · data.py · checkpoint.py ·
metrics.py · outputs.py
"""
from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    """`from budwood import train` must give the function the README documents, but Python binds the name
    `budwood.train` to this package as soon as anything imports it; so the package, called, is the recipe's
    `train(config, ...)`."""

    def __call__(self, *args, **kwargs):
        from budwood.train.recipe import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
