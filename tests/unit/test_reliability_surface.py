"""Format augmentation rewrites each training question in other surface forms, deterministically, never into
the reproducibility suite's own renderings (so the suite measures held-out phrasings), answer unchanged."""
from __future__ import annotations

import re

import pytest

from budwood.config import FormatAugmentationConfig
from budwood.data.company import company_facts
from budwood.data.formats import Conversation, Message, PreferencePair
from budwood.errors import DataError
from budwood.reliability.surface import FORMS, TEMPLATES, augment, suite_forms

SYSTEM = "You answer questions about Acme."


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.replace("'", ""))


@pytest.fixture(scope="module")
def items() -> list[Conversation]:
    _, facts, _ = company_facts(0)
    return [Conversation(([Message("system", SYSTEM)] if i % 2 else []) +
                         [Message("user", q), Message("assistant", f.answer)], f"t.jsonl:{i}")
            for i, (f, q) in enumerate((f, q) for f in facts for q in f.questions[:3])]


def test_variants_per_example_are_new_and_never_the_suites_own(items):
    out, report = augment(items, FormatAugmentationConfig(enabled=True, variants=3), seed=0)
    copies = out[len(items):]
    assert len(copies) == 3 * len(items) == report["examples_added"] and report["fewer_variants"] == 0
    assert sum(report["by_form"].values()) == len(copies) and set(report["by_form"]) == set(FORMS)
    for k, item in enumerate(items):
        mine = copies[3 * k:3 * k + 3]
        question = item.messages[-2].content
        texts = [c.messages[-2].content for c in mine]
        assert len(set(texts)) == 3 and question not in texts
        system = item.messages[0].content if item.messages[0].role == "system" else None
        assert not set(texts) & suite_forms(question, system)
        for c in mine:
            assert c.messages[-1] == item.messages[-1] and c.messages[:-2] == item.messages[:-2]
            assert c.source == item.source


def test_the_suites_renderings_are_what_it_asks(items):
    q = "What is the price of the Lamp?"
    forms = suite_forms(q, SYSTEM)
    assert {q.lower(), q.upper(), f"Question: {q}\nAnswer:", f"{SYSTEM}\n\n{q}"} <= forms


def test_same_seed_same_copies_other_seed_others(items):
    cfg = FormatAugmentationConfig(enabled=True)
    a, _ = augment(items, cfg, seed=1)
    b, _ = augment(items, cfg, seed=1)
    c, _ = augment(items, cfg, seed=2)
    assert [x.canonical() for x in a] == [x.canonical() for x in b]
    assert [x.canonical() for x in a] != [x.canonical() for x in c]
    assert a[:len(items)] == items


@pytest.mark.parametrize("form", list(FORMS))
def test_one_form_only(items, form):
    out, report = augment(items[:12], FormatAugmentationConfig(enabled=True, variants=1, forms=[form]), seed=0)
    assert report["by_form"] == {form: 12}
    for orig, copy in zip(items[:12], out[12:]):
        before, after = orig.messages[-2].content, copy.messages[-2].content
        if form == "case":
            assert after.lower() == before.lower() and after != before
        elif form == "spacing":
            assert after.split() == before.split() and after != before
        elif form == "punctuation":
            assert words(after) == words(before) and after != before
        else:
            assert before in after and any(t.replace("{q}", before) == after for t in TEMPLATES)


def test_pairs_get_their_prompt_rewritten():
    pair = PreferencePair([Message("user", "Where is Acme?")], [Message("assistant", "Leeds.")],
                          [Message("assistant", "Paris.")], "p.jsonl:1")
    out, _ = augment([pair], FormatAugmentationConfig(enabled=True, variants=2), seed=0)
    assert len(out) == 3
    for copy in out[1:]:
        assert copy.prompt[0].content != "Where is Acme?"
        assert copy.chosen == pair.chosen and copy.rejected == pair.rejected


def test_no_question_is_a_clear_error():
    only_assistant = Conversation([Message("system", "x"), Message("assistant", "hello")], "f.jsonl:1")
    with pytest.raises(DataError, match="reliability.format_augmentation"):
        augment([only_assistant], FormatAugmentationConfig(enabled=True), seed=0)
