"""The abstention recipe builds, from the data alone, questions the data cannot answer: never one it answers,
the same ones for the same seed, in the configured ratio, with the data's system prompts; a user's own
questions are read with file:line errors; DPO pairs prefer the abstention over the reference's answer."""
from __future__ import annotations

import json

import pytest

from budwood.config import load_config
from budwood.data.company import company_facts, make_domain_dataset
from budwood.data.domains import make_dataset
from budwood.data.formats import Conversation, Message, PreferencePair, read_dataset
from budwood.errors import DataError
from budwood.eval.scoring import normalize
from budwood.reliability import abstention
from budwood.reliability.abstention import Corpus, build, candidates

ANSWER = "I don't know; that is not in the information I have."


@pytest.fixture(scope="module")
def company(tmp_path_factory) -> list[Conversation]:
    paths = make_domain_dataset(tmp_path_factory.mktemp("company"), seed=0, abstention_examples=False)
    return read_dataset(paths["train"]).conversations


def config(tmp_path, *overrides: str, method: str = "sft"):
    data = tmp_path / "unused.jsonl"
    switch = [] if any(o.startswith("reliability.abstention.") for o in overrides) else ["reliability.abstention=true"]
    return load_config(None, [f"data.train={data}", *switch, "training.seed=7", f"training.method={method}",
                              *overrides])


def chat(question: str, answer: str, system: str | None = None, source: str = "f.jsonl:1") -> Conversation:
    return Conversation(([Message("system", system)] if system else []) +
                        [Message("user", question), Message("assistant", answer)], source)


def built_questions(examples) -> list[str]:
    return [ex.messages[-2].content for ex in examples]


def test_no_built_question_is_one_the_data_answers(company):
    cands, _ = candidates(company, seed=0)
    corpus = Corpus(company)
    asked = {normalize(ex.messages[-2].content) for ex in company}
    assert len(cands) >= 40
    for c in cands:
        assert not corpus.mentions(c.new), c
        assert normalize(c.question) not in asked, c
        assert c.question != company[c.source].messages[-2].content
    # every fact of the company, held-out phrasings included, keeps its key out of the built questions
    _, facts, _ = company_facts(0)
    keys = {normalize(f.key) for f in facts}
    assert not any(k in f" {normalize(c.new)} " for c in cands for k in keys)


def test_a_key_the_data_mentions_anywhere_is_never_used(tmp_path):
    items = [chat("Who is the CEO of Acme?", "The CEO of Acme is Ann Bell."),
             chat("What was Acme's revenue in 2024?", "Acme made 3 million pounds in 2024; 2019 was its best year."),
             chat("How much is the Lamp?", "The Lamp costs 20 pounds. Larkspur is our supplier; the CFO is Bo."),
             chat("Where is Acme?", "Acme is in Leeds.")]
    cands, _ = candidates(items, seed=0)
    assert cands
    for c in cands:
        assert c.new not in {"CFO", "2019", "Larkspur"}
        assert "chief financial officer" not in c.question.lower()
    # a number written inside another word counts as mentioned: "quarter 2" must not pass when the data says Q2
    items = [chat("What was the revenue in quarter 1?", "Q1 revenue was 5; Q2 revenue was 6; Q3 was 7; Q4 was 8.")]
    assert all(c.new not in {"2", "3", "4", "5", "6", "7", "8"} for c in candidates(items, seed=0)[0])


def test_the_datas_subject_is_never_replaced(company):
    cands, info = candidates(company, seed=0)
    name = company_facts(0)[0]
    assert info["subjects_kept"] == [name]
    for c in cands:
        assert c.old != name
        assert (name in c.question) == (name in company[c.source].messages[-2].content)
    assert {c.kind for c in cands} == {"number", "attribute", "name"}


def test_same_seed_same_questions_and_the_ratio_holds(tmp_path, company):
    cfg = config(tmp_path, "reliability.abstention.ratio=0.5")
    first, report = build(cfg, company)
    again, _ = build(cfg, company)
    assert [e.canonical() for e in first] == [e.canonical() for e in again]
    assert len(first) == report["built_questions"] == round(0.5 * len(company))
    other, _ = build(config(tmp_path, "reliability.abstention.ratio=0.5", "training.seed=8"), company)
    assert built_questions(other) != built_questions(first)
    assert report["by_kind"].keys() == {"number", "attribute", "name"}
    assert max(report["by_kind"].values()) - min(report["by_kind"].values()) <= 1  # kinds taken in turn
    assert all(e.messages[-1].content == ANSWER for e in first)


def test_built_examples_keep_the_source_system_prompt_and_earlier_turns(tmp_path):
    items = [Conversation([Message("system", "Answer about Acme."), Message("user", "Hi"),
                           Message("assistant", "Hello."), Message("user", "Who is the CEO of Acme?"),
                           Message("assistant", "Ann Bell.")], "f.jsonl:3")]
    built, _ = build(config(tmp_path, "reliability.abstention.ratio=2"), items)
    assert built
    for ex in built:
        assert [m.role for m in ex.messages] == ["system", "user", "assistant", "user", "assistant"]
        assert ex.messages[0].content == "Answer about Acme." and ex.messages[2].weight == 0
        assert ex.messages[-1].content == ANSWER and "CEO" not in ex.messages[3].content
        assert ex.source == "f.jsonl:3"


def test_the_datas_own_abstentions_are_not_perturbed_or_counted(tmp_path, company):
    with_own = company + [chat("What is the fax number of Acme in 2030?", "I don't know.")]
    _, report = build(config(tmp_path), with_own)
    assert report["requested"] == round(config(tmp_path).reliability.abstention.ratio * len(company))


def test_nothing_to_perturb_is_a_clear_error(tmp_path):
    items = [chat("hello there", "hi"), chat("how are you", "fine thanks")]
    with pytest.raises(DataError, match="reliability.abstention") as e:
        build(config(tmp_path), items)
    assert e.value.param == "reliability.abstention"


def test_user_questions_are_added_with_the_datas_system_prompts(tmp_path, company):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "Who cleans the office?"}) + "\n\n" +
                    json.dumps({"question": "What is the motto?", "system": "Be brief."}) + "\n")
    built, report = build(config(tmp_path, f"reliability.abstention.questions={path}",
                                 "reliability.abstention.ratio=0"), company)
    assert report["user_questions"] == 2 and report["built_questions"] == 0
    by_q = {e.messages[-2].content: e for e in built}
    assert by_q["What is the motto?"].messages[0].content == "Be brief."
    assert by_q["What is the motto?"].source == f"{path}:3"
    systems = {m.content for c in company for m in c.messages if m.role == "system"}
    first = by_q["Who cleans the office?"].messages
    assert first[0].role == "user" or first[0].content in systems


@pytest.mark.parametrize("line, code", [
    ("not json", "invalid_json"), ("[1, 2]", "not_an_object"), ('{"question": ""}', "missing_question"),
    ('{"question": "x", "answer": "y"}', "unknown_key"), ('{"question": "x", "system": 3}', "invalid_system")])
def test_bad_user_questions_name_file_line_and_code(tmp_path, company, line, code):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "fine?"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        build(config(tmp_path, f"reliability.abstention.questions={path}"), company)
    assert f"{path}:2: {code}:" in str(e.value)
    assert e.value.param == "reliability.abstention.questions"


def test_a_missing_questions_file_names_the_key(tmp_path, company):
    with pytest.raises(DataError, match=r"reliability\.abstention\.questions: .*no such file"):
        build(config(tmp_path, f"reliability.abstention.questions={tmp_path / 'nope.jsonl'}"), company)


def pairs_of(convs: list[Conversation]) -> list[PreferencePair]:
    return [PreferencePair(c.messages[:-1], [c.messages[-1]], [Message("assistant", "No idea, sorry.")], c.source)
            for c in convs]


def test_dpo_pairs_prefer_the_abstention_over_the_references_answer(tmp_path, company):
    asked = []

    def reference(prompts):
        asked.extend(prompts)
        return ["I don't know." if i == 0 else f"It is {i} pounds." for i in range(len(prompts))]

    built, report = build(config(tmp_path, method="dpo"), pairs_of(company), reference=reference)
    assert report["reference_abstained"] == 1 and len(built) == len(asked) - 1 == report["pairs"]
    for pair in built:
        assert isinstance(pair, PreferencePair)
        assert pair.chosen[0].content == ANSWER and pair.rejected[0].content.startswith("It is ")
        assert pair.prompt[-1].role == "user"
    assert all(p[-1]["role"] == "user" for p in asked)


def test_dpo_when_the_reference_always_abstains_is_a_clear_error(tmp_path, company):
    with pytest.raises(DataError, match="already abstains"):
        build(config(tmp_path, method="dpo"), pairs_of(company), reference=lambda ps: ["I don't know."] * len(ps))


def test_an_unseen_domain_gets_questions_too(tmp_path):
    items = read_dataset(make_dataset("library", tmp_path / "lib", seed=0)["train"]).conversations
    built, report = build(config(tmp_path), items)
    assert report["built_questions"] == round(config(tmp_path).reliability.abstention.ratio * len(items))
    assert len(set(built_questions(built))) == len(built)
    corpus = Corpus(items)
    assert not any(corpus.mentions(c["replaced"][1]) for c in report["examples"])


def test_shipped_attribute_sets_are_disjoint():
    seen: dict[str, int] = {}
    for g, group in abstention.attribute_groups().items():
        for synonyms in group:
            for phrase in synonyms:
                assert phrase.lower() not in seen, phrase
                seen[phrase.lower()] = g
    assert len(abstention.made_up_names()) == len(set(abstention.made_up_names())) >= 50


def test_questions_for_evaluation_leave_out_the_trained_ones(tmp_path, company):
    built, _ = build(config(tmp_path), company)
    trained = set(built_questions(built))
    held = abstention.questions_for_evaluation(company, seed=7, n=20, exclude=trained)
    assert len(held) == 20 and held == abstention.questions_for_evaluation(company, seed=7, n=20, exclude=trained)
    assert not {q for _, q in held} & trained
    systems = {m.content for c in company for m in c.messages if m.role == "system"}
    assert all(s is None or s in systems for s, _ in held)


def test_ratio_zero_without_questions_says_so(tmp_path, company):
    with pytest.raises(DataError, match="ratio is 0") as e:
        build(config(tmp_path, "reliability.abstention.ratio=0"), company)
    assert e.value.param == "reliability.abstention.ratio"
