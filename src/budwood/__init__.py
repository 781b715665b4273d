"""budwood: grow, prove, document, trade and serve LoRA domain adapters on open models.

The public verbs are imported lazily so that `budwood --help` does not import torch.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["train", "load_base", "read_dataset", "TrainConfig", "BudwoodError"]


def __getattr__(name: str):
    if name == "train":
        from budwood.train.recipe import train

        return train
    if name == "load_base":
        from budwood.models.load import load_base

        return load_base
    if name == "read_dataset":
        from budwood.data.formats import read_dataset

        return read_dataset
    if name == "TrainConfig":
        from budwood.config import TrainConfig

        return TrainConfig
    if name == "BudwoodError":
        from budwood.errors import BudwoodError

        return BudwoodError
    raise AttributeError(f"module 'budwood' has no attribute {name!r}")
