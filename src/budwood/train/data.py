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
from budwood.data.template import Encoded, EncodedPair, encode_conversations, encode_pairs, template_family_problem
from budwood.errors import DataError, TrainingError

KIND_OF_METHOD = {"sft": "sft", "dpo": "preference"}


@dataclass
class PreparedData:
    train: list[Encoded] | list[EncodedPair]
    validation: list[Encoded] | list[EncodedPair]
    fingerprints: dict
    issues: list[Issue] = field(default_factory=list)
    reliability: dict = field(default_factory=dict)  # what each reliability recipe added (provenance, the card)


def read_for_method(path, config: TrainConfig, min_examples: int = 1, format: str | None = None,
                    **where) -> Dataset:
    """A data source, refused by name when its kind is not the method's (preference pairs to SFT, or chat data
    to DPO): training on it would silently learn something else. `where`: split, subset, fields."""
    ds = read_dataset(path, format or config.data.format, min_examples, **where)
    method = config.training.method
    if ds.kind != KIND_OF_METHOD[method]:
        hint = ("set training.method=dpo to learn from preference pairs" if ds.kind == "preference" else
                "DPO needs preference pairs: OpenAI's {input, preferred_output, non_preferred_output} or TRL's "
                "{prompt, chosen, rejected}")
        raise DataError(f"{path}: this is {'preference' if ds.kind == 'preference' else 'chat (SFT)'} data "
                        f"({ds.format}) but training.method is {method}; {hint}")
    return ds


def mix_sources(sources: list, pools: list[list[Example]], seed: int) -> list[Example]:
    """The examples of several sources, each `weight` times: whole copies, then a seeded draw of the fraction
    (the same draw every epoch, so an epoch's length and a resume's position are fixed). One source of
    weight 1 is its examples as they are."""
    import random

    if len(sources) == 1 and sources[0].weight == 1:
        return pools[0]
    mixed: list[Example] = []
    for i, (source, examples) in enumerate(zip(sources, pools)):
        whole, fraction = divmod(source.weight, 1)
        mixed += examples * int(whole)
        take = round(len(examples) * fraction)
        if take:
            rng = random.Random(f"{seed}:{i}:{source.path}")
            mixed += [examples[j] for j in sorted(rng.sample(range(len(examples)), take))]
        if not examples:
            raise DataError(f"{source.path}: no examples left to train on (after data.validation_split and "
                            "max_examples)")
        if not whole and not take:
            raise DataError(f"{source.path}: weight {source.weight} of {len(examples)} examples leaves none to "
                            "train on; raise its weight")
    return mixed


def encode(tokenizer, examples: list[Example], max_len: int, issues: list[Issue]) -> list:
    if examples and not hasattr(examples[0], "messages"):
        return encode_pairs(tokenizer, examples, max_len, issues)
    return encode_conversations(tokenizer, examples, max_len, issues)


def prepare_data(config: TrainConfig, tokenizer) -> PreparedData:
    """Read, validate, split and tokenise; warnings are collected, errors raise DataError."""
    dc = config.data
    from budwood.eval.data import is_eval_only

    sources = dc.train_sources
    for path in [*(s.path for s in sources), dc.validation]:
        if path is not None and is_eval_only(path):
            raise DataError(f"{path}: this is one of budwood's evaluation sets; training on it would void its "
                            "scores, and some are licensed for evaluation only")
    read = [read_for_method(s.path, config, 1 if len(sources) > 1 else dc.min_examples, s.format,
                            split=s.split, subset=s.subset, fields=s.field_map()) for s in sources]
    issues = [i for ds in read for i in ds.issues]
    pools = [ds.examples[:s.max_examples] for s, ds in zip(sources, read)]
    if dc.chat_template and (problem := template_family_problem(tokenizer, dc.chat_template)):
        raise DataError(problem)
    val_convs: list[Example] = []
    val_ds: Dataset | None = None
    if dc.validation is not None:
        val_ds = read_for_method(dc.validation, config)
        issues += val_ds.issues
        val_convs = val_ds.examples
    elif dc.validation_split > 0:  # each source's share held out before mixing: no example on both sides
        held = [split_validation(pool, dc.validation_split, config.training.seed) for pool in pools]
        pools, val_convs = [t for t, _ in held], [v for _, vs in held for v in vs]
    convs = mix_sources(sources, pools, config.training.seed)
    if len(convs) < dc.min_examples:
        raise DataError(f"{len(convs)} examples from {len(sources)} sources, at least {dc.min_examples} needed "
                        "(data.min_examples)")
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
        raise TrainingError(f"{dc.train or 'data.sources'}: no example has trainable assistant tokens")
    tool_examples = sum(getattr(c, "uses_tools", False) for c in convs)  # the card lists the tools suite for them
    fingerprints = {"train": {"path": str(dc.train or sources[0].path), "format": read[0].format,
                              "examples": len(convs), "fingerprint": data_fingerprint(convs),
                              **({"tool_examples": tool_examples} if tool_examples else {})}}
    if dc.sources:  # each source as read, and how much of it the mix took
        fingerprints["train"]["sources"] = [
            {"path": s.path, "format": ds.format, "weight": s.weight, "examples": len(pool),
             "fingerprint": data_fingerprint(pool), **({"split": s.split} if s.split != "train" else {})}
            for s, ds, pool in zip(sources, read, pools)]
    if augmented is not convs:  # what was trained on, recipes included
        fingerprints["train"]["augmented"] = {"examples": len(augmented), "fingerprint": data_fingerprint(augmented)}
    if val_convs:
        fingerprints["validation"] = {"path": str(dc.validation or dc.train or "data.sources"),
                                      "examples": len(val_convs),
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
