"""Recipes that make an adapter more reliable by changing what it is trained on (docs/reliability.md).

`apply_recipes` is called by training's data preparation on the training split only, after the validation
split is taken (so validation measures the data as given). The enabled recipes run in a fixed order, each
seeded from `training.seed`, so one config and one data file always give the same examples:

1. abstention: questions the data cannot answer, built from it, with the abstention answer as target;
2. counterfactual: copies of examples that say who is asking, with demographic terms and names swapped;
3. format_augmentation: copies of every example (the built ones too) with its question in other surface
   forms.

Each recipe's report (what it built, what it refused and why) goes into provenance and onto the card.
`calibration` is not a data recipe: it is applied after training.
"""
from __future__ import annotations

from pathlib import Path

from budwood.config import TrainConfig
from budwood.data.formats import Example

DATA_RECIPES = ("abstention", "counterfactual", "format_augmentation")


def apply_recipes(config: TrainConfig, items: list[Example], *, tokenizer,
                  init_adapter: Path | None = None) -> tuple[list[Example], dict]:
    """The training items with the enabled data recipes applied, and a JSON-able report per recipe.

    `items` are Conversations (training.method sft) or PreferencePairs (dpo). `init_adapter` is the run's
    resolved init adapter folder (when config.init_adapter is a registry id), DPO abstention's reference."""
    from budwood.reliability import abstention, counterfactual, surface
    from budwood.reliability import items as it

    rel, seed, method = config.reliability, config.training.seed, config.training.method
    it.same_kind(items, method)
    out, report = list(items), {}
    if rel.abstention.enabled:
        reference = _reference(config, tokenizer, items, init_adapter) if method == "dpo" else None
        built, report["abstention"] = abstention.build(config, out, reference=reference)
        report["abstention"].update(examples_before=len(out), examples_after=len(out) + len(built))
        out += built
    if rel.counterfactual.enabled:
        before = len(out)
        out, report["counterfactual"] = counterfactual.augment(out, rel.counterfactual, seed)
        report["counterfactual"].update(examples_before=before, examples_after=len(out))
    if rel.format_augmentation.enabled:
        before = len(out)
        out, report["format_augmentation"] = surface.augment(out, rel.format_augmentation, seed)
        report["format_augmentation"].update(examples_before=before, examples_after=len(out))
    return out, report


def _reference(config: TrainConfig, tokenizer, items: list[Example], init_adapter: Path | None):
    """DPO's rejected answers: the reference policy's greedy replies, up to the data's longest answer."""
    from budwood.reliability import items as it
    from budwood.reliability.reference import reference_answers

    longest = max((len(tokenizer(it.answer(x), add_special_tokens=False)["input_ids"]) for x in items), default=64)
    return lambda prompts: reference_answers(config, prompts, max(16, longest), init_adapter)
