"""apply_recipes: the enabled data recipes in their fixed order on the training split only, deterministic, with
one report per recipe in provenance. (DPO abstention pairs, which sample the reference model, are tested in
tests/e2e/test_reliability.py.)"""
from __future__ import annotations

import json

import pytest

from budwood.config import load_config
from budwood.data.company import make_domain_dataset
from budwood.data.formats import data_fingerprint, read_dataset
from budwood.errors import DataError
from budwood.reliability import apply_recipes
from budwood.train.data import prepare_data

ALL = ["reliability.abstention=true", "reliability.counterfactual=true", "reliability.format_augmentation=true"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    paths = make_domain_dataset(tmp_path_factory.mktemp("company"), seed=0, abstention_examples=False)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    # a few examples that say who asks, so the counterfactual recipe has something to swap
    for row in rows[:6]:
        row["messages"][-2]["content"] = "I am a woman. " + row["messages"][-2]["content"]
    paths["train"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def cfg(data, *overrides: str):
    return load_config(None, [f"data.train={data['train']}", f"data.validation={data['validation']}",
                              "training.seed=3", *overrides])


def test_all_three_in_order_deterministic(data, tiny_tokenizer):
    items = read_dataset(data["train"]).conversations
    out, report = apply_recipes(cfg(data, *ALL), items, tokenizer=tiny_tokenizer)
    again, _ = apply_recipes(cfg(data, *ALL), items, tokenizer=tiny_tokenizer)
    assert data_fingerprint(out) == data_fingerprint(again)
    assert list(report) == ["abstention", "counterfactual", "format_augmentation"]
    ab, cf, fa = report["abstention"], report["counterfactual"], report["format_augmentation"]
    assert ab["examples_before"] == len(items) and ab["examples_after"] == cf["examples_before"]
    assert cf["examples_after"] == fa["examples_before"] and fa["examples_after"] == len(out)
    assert fa["examples_after"] == fa["examples_before"] * 3  # two variants of every example, built ones too
    assert out[:len(items)] == items
    json.dumps(report)  # provenance and the card take it as it is


def test_calibration_alone_changes_no_data(data, tiny_tokenizer):
    items = read_dataset(data["train"]).conversations
    out, report = apply_recipes(cfg(data, "reliability.calibration=true"), items, tokenizer=tiny_tokenizer)
    assert out == items and report == {}


def test_prepare_data_applies_them_to_the_training_split_only(data, tiny_tokenizer):
    plain = prepare_data(cfg(data), tiny_tokenizer)
    prepared = prepare_data(cfg(data, "reliability.abstention=true"), tiny_tokenizer)
    added = prepared.reliability["abstention"]["examples_added"]
    assert added > 0 and len(prepared.train) == len(plain.train) + added
    assert len(prepared.validation) == len(plain.validation)
    assert prepared.fingerprints["train"]["augmented"]["examples"] == len(prepared.train)


def test_items_of_the_wrong_kind_are_refused(data, tiny_tokenizer):
    items = read_dataset(data["train"]).conversations
    with pytest.raises(DataError, match="training.method is dpo"):
        apply_recipes(cfg(data, *ALL, "training.method=dpo"), items, tokenizer=tiny_tokenizer)
