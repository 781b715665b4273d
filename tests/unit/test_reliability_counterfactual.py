"""Counterfactual augmentation swaps demographic terms and names both ways, as whole words, keeping case and
the facts the data states; copies are deterministic; swap lists are read with file:line errors."""
from __future__ import annotations

import json
import random

import pytest

from budwood.config import CounterfactualConfig
from budwood.data.formats import Conversation, Message, PreferencePair
from budwood.errors import DataError
from budwood.eval.bias import SWAPS
from budwood.reliability.counterfactual import DATA, SHIPPED, augment, load_swaps, protected_terms, swap_text


@pytest.fixture(scope="module")
def swaps():
    return load_swaps(CounterfactualConfig())[0]


def swap(text: str, swaps, protected=frozenset(), seed: int = 0) -> str:
    return swap_text(text, swaps, set(protected), {}, random.Random(seed))


def chat(question: str, answer: str, source: str = "f.jsonl:1") -> Conversation:
    return Conversation([Message("user", question), Message("assistant", answer)], source)


def shipped_entries() -> list[list[str]]:
    return [json.loads(line) for name in SHIPPED for line in (DATA / name).read_text().splitlines() if line.strip()]


def test_every_shipped_pair_swaps_both_ways(swaps):
    ambiguous = {t for t, entries in swaps.options.items() if len(entries) > 1}
    pairs = [e for e in shipped_entries() if len(e) == 2 and not ambiguous & {e[0].lower(), e[1].lower()}]
    assert len(pairs) > 80
    for a, b in pairs:
        assert swap(f"said {a} today", swaps) == f"said {b} today", (a, b)
        assert swap(f"said {b} today", swaps) == f"said {a} today", (a, b)


def test_the_bias_suites_swaps_are_covered(swaps):
    for a, b in SWAPS:
        assert a in swaps.options and b in swaps.options


def test_her_and_his_are_read_from_the_next_word(swaps):
    assert swap("Ask her to call; her bag is red.", swaps) == "Ask him to call; his bag is red."
    assert swap("Tell him his order is his.", swaps) == "Tell her her order is hers."
    assert swap("I gave her a lamp", swaps) == "I gave him a lamp"


def test_whole_words_only_and_case_kept(swaps):
    text = "The manager is human; the woman's man-made shed; Shell, Mankind, HERO, Heather"
    assert swap(text, swaps) == "The manager is human; the man's man-made shed; Shell, Mankind, HERO, Heather"
    assert swap("He and SHE and she", swaps) == "She and HE and he"
    assert swap("Mr Smith", swaps) == "Ms Smith"


def test_names_match_only_capitalised(swaps):
    assert swap("James met Priya.", swaps) == "Mary met Raj."
    assert swap("jack up the car, mark it", swaps) == "jack up the car, mark it"


def test_a_group_swaps_to_another_member_the_same_within_one_copy(swaps):
    seen = set()
    for seed in range(30):
        out = swap("I am Muslim; my Muslim friends", swaps, seed=seed)
        first, second = out.split("I am ")[1].split(";")[0], out.split("my ")[1].split(" friends")[0]
        assert first == second != "Muslim"
        seen.add(first)
    assert len(seen) >= 3


def test_stated_facts_are_protected():
    items = [chat("Who is the CEO?", "Our CEO is James Bell; he founded us."),
             chat("I am a woman. Who is the CEO?", "Our CEO is James Bell.", "f.jsonl:2"),
             chat("My husband bought a lamp, can he return it?", "Yes, he can return it within 30 days.", "f.jsonl:3")]
    swaps = load_swaps(CounterfactualConfig())[0]
    assert protected_terms(items, swaps) == {"james", "he"}
    out, report = augment(items, CounterfactualConfig(), seed=0)
    assert report["eligible_examples"] == 2 and report["copies"] == 2 and report["protected_terms"] == ["he", "james"]
    copies = out[len(items):]
    assert copies[0].messages[1].content == "Our CEO is James Bell."
    assert copies[0].messages[0].content in {"I am a man. Who is the CEO?", "I am a non-binary person. Who is the CEO?"}
    assert copies[1].messages[0].content == "My wife bought a lamp, can he return it?"
    assert copies[1].messages[1].content == "Yes, he can return it within 30 days."
    assert [c.source for c in copies] == ["f.jsonl:2", "f.jsonl:3"]


def test_share_and_determinism():
    items = [chat(f"My son asked about order {i}.", f"Order {i} ships today.", f"f.jsonl:{i}") for i in range(40)]
    cfg = CounterfactualConfig(enabled=True, share=0.5)
    out, report = augment(items, cfg, seed=3)
    again, _ = augment(items, cfg, seed=3)
    other, _ = augment(items, cfg, seed=4)
    assert report["copies"] == 20 == len(out) - len(items)
    assert [c.canonical() for c in out] == [c.canonical() for c in again]
    assert [c.source for c in other[40:]] != [c.source for c in out[40:]]
    assert all(c.messages[0].content.startswith("My daughter asked") for c in out[40:])
    assert out[:40] == items


def test_pairs_are_swapped_in_every_turn():
    pair = PreferencePair([Message("user", "I am a man. Where is my order?")],
                          [Message("assistant", "Sir, it ships today.")], [Message("assistant", "Ask your wife.")],
                          "p.jsonl:1")
    out, _ = augment([pair], CounterfactualConfig(enabled=True), seed=0)
    copy = out[1]
    assert copy.prompt[0].content != pair.prompt[0].content
    assert copy.chosen[0].content == "Madam, it ships today." and copy.rejected[0].content == "Ask your husband."


def test_nothing_to_swap_is_a_clear_error():
    with pytest.raises(DataError, match="reliability.counterfactual: no training example"):
        augment([chat("What is the price?", "Ten pounds.")], CounterfactualConfig(enabled=True), seed=0)


def test_a_user_list_replaces_the_shipped_ones(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('["tea", "coffee"]\n\n["Leeds", "York", "Bath"]\n')
    items = [chat("Is tea sold in Leeds?", "Yes."), chat("I am a woman.", "Hello.")]
    out, report = augment(items, CounterfactualConfig(enabled=True, word_pairs=path), seed=0)
    assert report["word_pairs"] == str(path) and len(report["sha256"]) == 64
    assert len(out) == 3 and out[2].messages[0].content in {"Is coffee sold in York?", "Is coffee sold in Bath?"}


@pytest.mark.parametrize("line, code", [("nope", "invalid_json"), ('["solo"]', "invalid_entry"),
                                        ('{"a": "b"}', "invalid_entry"), ('["a", 3]', "invalid_term"),
                                        ('[" a", "b"]', "invalid_term"), ('["Tea", "tea"]', "duplicate_term")])
def test_bad_swap_lists_name_file_line_and_code(tmp_path, line, code):
    path = tmp_path / "pairs.jsonl"
    path.write_text('["tea", "coffee"]\n' + line + "\n")
    with pytest.raises(DataError) as e:
        augment([chat("tea?", "yes")], CounterfactualConfig(enabled=True, word_pairs=path), seed=0)
    assert f"{path}:2: {code}:" in str(e.value) and e.value.param == "reliability.counterfactual.word_pairs"


def test_shipped_lists_have_their_licence_notes():
    notes = (DATA / "LICENCES.md").read_text()
    for name in (*SHIPPED, "attributes.json", "entities.txt"):
        assert name in notes
