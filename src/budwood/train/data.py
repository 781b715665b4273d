"""The recipe's data: the files read, checked against the method (chat data for SFT, preference pairs for
DPO), split, augmented by the reliability recipes asked for, tokenised once; and the loop's place in the epochs.

The plan of an epoch (which examples form each micro-batch, in which order) is a pure function of
(seed, epoch), so a position in it is two integers and a resume lands on the same examples.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from budwood.config import TrainConfig
from budwood.data.formats import Dataset, Example, Issue, data_fingerprint, read_dataset
from budwood.data.split import split_validation
from budwood.data.template import Encoded, EncodedPair, encode_conversations, encode_pairs
from budwood.errors import DataError, TrainingError

KIND_OF_METHOD = {"sft": "sft", "dpo": "preference"}


@dataclass
class PreparedData:
    train: list[Encoded] | list[EncodedPair]
    validation: list[Encoded] | list[EncodedPair]
    fingerprints: dict
    issues: list[Issue] = field(default_factory=list)
    reliability: dict = field(default_factory=dict)  # what each reliability recipe added (provenance, the card)


def read_for_method(path, config: TrainConfig, min_examples: int = 1) -> Dataset:
    """A data file, refused by name when its kind is not the method's (preference pairs to SFT, or chat data to
    DPO): training on it would silently learn something else."""
    ds = read_dataset(path, config.data.format, min_examples)
    method = config.training.method
    if ds.kind != KIND_OF_METHOD[method]:
        hint = ("set training.method=dpo to learn from preference pairs" if ds.kind == "preference" else
                "DPO needs preference pairs: OpenAI's {input, preferred_output, non_preferred_output} or TRL's "
                "{prompt, chosen, rejected}")
        raise DataError(f"{path}: this is {'preference' if ds.kind == 'preference' else 'chat (SFT)'} data "
                        f"({ds.format}) but training.method is {method}; {hint}")
    return ds


def encode(tokenizer, examples: list[Example], max_len: int, issues: list[Issue]) -> list:
    if examples and not hasattr(examples[0], "messages"):
        return encode_pairs(tokenizer, examples, max_len, issues)
    return encode_conversations(tokenizer, examples, max_len, issues)


def prepare_data(config: TrainConfig, tokenizer) -> PreparedData:
    """Read, validate, split and tokenise; warnings are collected, errors raise DataError."""
    dc = config.data
    from budwood.eval.data import is_eval_only

    for path in (dc.train, dc.validation):
        if path is not None and is_eval_only(path):
            raise DataError(f"{path}: this is one of budwood's evaluation sets; training on it would void its "
                            "scores, and some are licensed for evaluation only")
    train_ds = read_for_method(dc.train, config, dc.min_examples)
    issues = list(train_ds.issues)
    convs = train_ds.examples
    val_convs: list[Example] = []
    val_ds: Dataset | None = None
    if dc.validation is not None:
        val_ds = read_for_method(dc.validation, config)
        issues += val_ds.issues
        val_convs = val_ds.examples
    elif dc.validation_split > 0:
        convs, val_convs = split_validation(convs, dc.validation_split, config.training.seed)
    reliability: dict = {}
    if {"abstention", "counterfactual", "format_augmentation"} & set(config.reliability.applied):
        from budwood.reliability import apply_recipes

        augmented, reliability = apply_recipes(config, convs, tokenizer=tokenizer)
    else:
        augmented = convs
    max_len = config.training.max_seq_len
    train = encode(tokenizer, augmented, max_len, issues)
    validation = encode(tokenizer, val_convs, max_len, issues) if val_convs else []
    errors = [i for i in issues if i.level == "error"]
    if errors:
        raise DataError(f"{len(errors)} example(s) cannot be tokenised:\n" + "\n".join(map(str, errors[:50])), errors)
    if not train:
        raise TrainingError(f"{dc.train}: no example has trainable assistant tokens")
    tool_examples = sum(getattr(c, "uses_tools", False) for c in convs)  # the card lists the tools suite for them
    fingerprints = {"train": {"path": str(dc.train), "format": train_ds.format, "examples": len(convs),
                              "fingerprint": data_fingerprint(convs),
                              **({"tool_examples": tool_examples} if tool_examples else {})}}
    if augmented is not convs:  # what was trained on, recipes included
        fingerprints["train"]["augmented"] = {"examples": len(augmented), "fingerprint": data_fingerprint(augmented)}
    if val_convs:
        fingerprints["validation"] = {"path": str(dc.validation or dc.train), "examples": len(val_convs),
                                      "fingerprint": data_fingerprint(val_convs),
                                      "split": dc.validation_split if val_ds is None else None}
    return PreparedData(train, validation, fingerprints, issues, reliability)


@dataclass
class EpochCursor:
    """The loop's place in the data: micro-batch `cursor` of epoch `epoch`'s plan. It runs ahead of
    the run state while a step is in flight; the step's end commits it."""

    plan_for: Callable[[int], list[list[int]]]  # epoch -> its micro-batches (lists of example indices)
    epoch: int = 0
    cursor: int = 0
    plan: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.plan = self.plan_for(self.epoch)

    def take(self, n: int) -> list[list[int]]:
        """The next `n` micro-batches; an accumulation window runs across an epoch's end."""
        window = []
        while len(window) < n:
            if self.cursor >= len(self.plan):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.plan = self.plan_for(self.epoch)
            window.append(self.plan[self.cursor])
            self.cursor += 1
        return window

    @property
    def epochs(self) -> float:
        """Epochs done, as a fraction (metrics lines and provenance)."""
        return round(self.epoch + self.cursor / max(len(self.plan), 1), 4)
