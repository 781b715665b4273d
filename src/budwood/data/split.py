"""The validation split held out of a training file: one function, so that training, the evaluation of the
adapter it made and the fine-tuning service's evaluation hold out the very same examples."""
from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")


def split_validation(examples: list[T], share: float, seed: int) -> tuple[list[T], list[T]]:
    """(kept for training, held out): `share` of the examples (at least one), drawn by a seeded shuffle; both
    lists keep the file's order."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, round(len(examples) * share))])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])
