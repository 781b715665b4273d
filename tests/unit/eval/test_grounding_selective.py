"""The grounding suite's additions: selective-prediction metrics (AURC, ECE, the risk-coverage curve) on
hand-computed cases, free-text reference answers and their criterion, questions built from chat data, the
grounding file written and read back, and the suite run under calibrated abstention on a scripted target
(no model: each question's answer and token log-probabilities are given)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from budwood.data.formats import Conversation, Message
from budwood.errors import DataError
from budwood.eval import grounding, scoring
from budwood.eval.confidence import AbstentionPolicy, ScoreKind
from budwood.eval.context import EvalContext
from budwood.eval.data import Question, read_questions, write_questions
from budwood.eval.targets import Completion, Gen

ALL = np.ones(4, dtype=bool)
DATA = np.arange(4)[None]  # the index matrix of the data itself (no resampling)


# -- AURC, ECE, risk-coverage ------------------------------------------------------------------------------
def test_aurc_is_the_mean_risk_of_the_k_most_confident_answers():
    conf, correct = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1.0, 0.0, 1.0, 0.0])
    # risks of the top 1..4: 0, 1/2, 1/3, 1/2
    assert scoring.aurc(conf, correct, ALL, DATA)[0] == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)


def test_aurc_of_a_perfect_ranking_is_the_least_for_its_error_rate_and_order_matters():
    correct = np.array([1.0, 1.0, 0.0, 0.0])
    best = scoring.aurc(np.array([0.9, 0.8, 0.2, 0.1]), correct, ALL, DATA)[0]
    worst = scoring.aurc(np.array([0.1, 0.2, 0.8, 0.9]), correct, ALL, DATA)[0]
    assert best == pytest.approx((0 + 0 + 1 / 3 + 1 / 2) / 4)
    assert worst == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4)


def test_the_models_own_abstentions_are_never_kept_whatever_their_confidence():
    conf, correct = np.array([0.99, 0.8, 0.7, 0.6]), np.array([0.0, 1.0, 0.0, 1.0])
    answered = np.array([False, True, True, True])
    # the ranked answers are 0.8 (right), 0.7 (wrong), 0.6 (right): risks 0, 1/2, 1/3
    assert scoring.aurc(conf, correct, answered, DATA)[0] == pytest.approx((0 + 1 / 2 + 1 / 3) / 3)
    curve = scoring.risk_coverage(conf, correct, answered)
    assert curve["coverage"] == [0.25, 0.5, 0.75]  # of all four questions
    assert curve["risk"] == pytest.approx([0, 0.5, 1 / 3], abs=1e-6)
    assert curve["threshold"] == [0.8, 0.7, 0.6]


def test_ece_by_hand_over_ten_bins():
    conf, correct = np.array([0.95, 0.95, 0.25, 0.25]), np.array([1.0, 0.0, 0.0, 0.0])
    # bin 9: accuracy 0.5, confidence 0.95, half the answers; bin 2: accuracy 0, confidence 0.25, half
    assert scoring.expected_calibration_error(conf, correct, ALL, DATA)[0] == pytest.approx(0.5 * 0.45 + 0.5 * 0.25)
    assert scoring.expected_calibration_error(np.array([1.0, 1.0, 0.0, 0.0]), np.array([1.0, 1.0, 0.0, 0.0]), ALL,
                                              DATA)[0] == 0  # confidence 1 falls in the last bin, not an 11th


def test_selective_metrics_take_bootstrap_rows():
    conf, correct = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1.0, 0.0, 1.0, 0.0])
    idx = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 2, 3]])
    assert scoring.aurc(conf, correct, ALL, idx).tolist() == pytest.approx([0, 1, 1 / 3])
    assert scoring.expected_calibration_error(conf, correct, ALL, idx).tolist() == pytest.approx([0.1, 0.8, 0.45])


# -- reference answers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, right", [
    ("Quillfeather was founded in 1987.", True),
    ("1987", True),
    ("It was founded in 1987, I believe.", True),
    ("Quillfeather was founded in 1992.", False),  # token F1 0.8: overlap alone would credit it
    ("I don't know.", False),
])
def test_a_reference_is_matched_by_its_numbers_and_names(answer, right):
    reference, question = "Quillfeather was founded in 1987.", "When was Quillfeather founded?"
    assert scoring.matches_reference(answer, reference, question) is right


def test_reference_keys_are_the_numbers_and_names_the_question_lacks():
    assert scoring.reference_keys("The chief executive of Quillfeather is Ada Pennyworth.",
                                  "Who runs Quillfeather?") == ["Ada", "Pennyworth"]
    assert scoring.reference_keys("Quillfeather had revenue of 3.4 million pounds in Q1 2024.",
                                  "What was Quillfeather's revenue in Q1 2024?") == ["3.4"]
    assert scoring.matches_reference("revenue was 3.4 million", "Quillfeather had revenue of 3.4 million pounds "
                                     "in Q1 2024.", "What was Quillfeather's revenue in Q1 2024?")
    assert not scoring.matches_reference("The chief executive is Bram Ashdown.",
                                         "The chief executive of Quillfeather is Ada Pennyworth.", "Who runs it?")


def test_a_reference_without_numbers_or_names_needs_half_of_its_new_words():
    assert scoring.matches_reference("Paris.", "Paris is the capital of France.", "What is the capital of France?")
    assert not scoring.matches_reference("Lyon is the capital of France.", "Paris is the capital of France.",
                                         "What is the capital of France?")  # token F1 0.8
    reference, question = "You can return items within a month of delivery.", "What is the return policy?"
    # new words: you can items within month of delivery
    assert scoring.matches_reference("You can return items within a month.", reference, question)  # 5 of 7
    assert not scoring.matches_reference("Within a month.", reference, question)  # 2 of 7
    assert not scoring.matches_reference("We ship worldwide.", reference, question)
    assert scoring.matches_reference("Yes, the return policy", "The return policy.", "What is the return policy?")


def test_grounding_verdict_with_a_reference():
    ref, q = "Harrowgate is where Quillfeather is based.", "Where is Quillfeather based?"
    assert scoring.grounding_verdict("In Harrowgate.", None, reference=ref, question=q) == "correct"
    assert scoring.grounding_verdict("In Duncastle.", None, reference=ref, question=q) == "wrong"
    assert scoring.grounding_verdict("I don't know.", None, reference=ref, question=q) == "abstained"
    assert scoring.grounding_verdict("In Duncastle.", None) == "answered"


# -- questions from chat data, the file format --------------------------------------------------------------
def test_questions_from_conversations():
    convs = [
        Conversation([Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello"),
                      Message("user", "Where is Quillfeather based?"), Message("assistant", "In Harrowgate.")], "a:1"),
        Conversation([Message("user", "Who is the CFO?"), Message("assistant", "I don't know; that is not in my "
                                                                               "information.")], "a:2"),
        Conversation([Message("user", "Dangling question")], "a:3"),
    ]
    qs = grounding.questions_from_conversations(convs, system="Default system.")
    assert [(q.question, q.system, q.reference, q.answerable) for q in qs] == [
        ("Where is Quillfeather based?", "Be brief.", "In Harrowgate.", True),
        ("Who is the CFO?", "Default system.", None, False)]


def test_write_questions_reads_back_the_same_questions(tmp_path):
    qs = [Question("When was it founded?", ["It was founded in 1987.", "1987"], "sys", "founded"),
          Question("Where is it?", None, None, None, "It is in Harrowgate."),
          Question("What is its ticker?", None, "sys")]
    path = write_questions(tmp_path / "sub" / "q.jsonl", qs)
    assert read_questions(path) == qs
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"question": "When was it founded?", "answer": "It was founded in 1987.", "answers": ["1987"],
                     "system": "sys", "fact": "founded"}


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "answer": "x", "reference": "y"}, "give 'answer'"),
    ({"question": "q", "reference": ""}, "field 'reference' must be a non-empty string"),
    ({"question": "q", "reference": 3}, "field 'reference' must be a non-empty string"),
    ({"question": "q", "answer": None, "system": 1}, "field 'system' must be a string"),
])
def test_bad_reference_rows_name_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "fine", "answer": None}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match="q.jsonl:2: ") as e:
        read_questions(path)
    assert message in str(e.value)


# -- the suite on a scripted target -----------------------------------------------------------------------------
class Scripted:
    """A target whose answer to each question, and its tokens' log-probabilities, are given."""

    can_score = True

    def __init__(self, script: dict[str, tuple[str, list[float]]], logprobs: bool = True):
        self.script, self.logprobs, self.asked = script, logprobs, []

    def generate(self, conversations, gen: Gen, schedule="together") -> list[Completion]:
        self.asked.append(gen)
        out = []
        for conv in conversations:
            text, lps = self.script[conv[-1]["content"]]
            out.append(Completion(text, lps if gen.logprobs and self.logprobs else None))
        return out

    def chat(self, conversations, gen: Gen, schedule="together") -> list[str]:
        return [c.text for c in self.generate(conversations, gen, schedule)]


SCRIPT = {  # question -> (answer, token log-probabilities); confidence = exp(mean)
    "When was Quillfeather founded?": ("In 1987.", [-0.1, -0.1]),  # right, confident
    "Where is Quillfeather based?": ("In Duncastle.", [-2.0, -2.0]),  # wrong, unsure
    "Who runs Quillfeather?": ("I don't know.", [-0.5]),  # abstains by itself
    "What is the ticker of Quillfeather?": ("QFT.", [-3.0]),  # made up, unsure
    "Who is the CFO of Quillfeather?": ("Ada Pennyworth.", [-0.2]),  # made up, confident
}


def _questions(tmp_path):
    return write_questions(tmp_path / "q.jsonl", [
        Question("When was Quillfeather founded?", None, reference="Quillfeather was founded in 1987."),
        Question("Where is Quillfeather based?", ["Harrowgate"]),
        Question("Who runs Quillfeather?", None, reference="The chief executive of Quillfeather is Ada Pennyworth."),
        Question("What is the ticker of Quillfeather?", None),
        Question("Who is the CFO of Quillfeather?", None)])


def test_grounding_reports_selective_metrics_and_keeps_its_numbers(tmp_path):
    cfg = grounding.GroundingConfig(data=_questions(tmp_path))
    res = grounding.run(EvalContext(Scripted(SCRIPT), bootstrap=200), cfg, limit=None, records=True)
    m = res.metrics
    assert [r["verdict"] for r in res.records] == ["correct", "wrong", "abstained", "answered", "answered"]
    assert m["hallucination_rate"].value == pytest.approx(3 / 5)
    assert m["unanswerable_abstained"].value == 0 and "calibrated_abstentions" not in m
    # answers given, most confident first: 1987 (right, e^-0.1), CFO (made up, e^-0.2), Duncastle, ticker
    assert [r["confidence"] for r in res.records][:2] == pytest.approx([math.exp(-0.1), math.exp(-2.0)])
    assert m["aurc"].value == pytest.approx((0 + 1 / 2 + 2 / 3 + 3 / 4) / 4) and m["aurc"].n == 5
    assert m["aurc"].ci is not None and m["aurc"].higher_is_better is False
    gaps = [1 - math.exp(-0.1), math.exp(-0.2), math.exp(-2.0), math.exp(-3.0)]  # |right - confidence|, own bins
    assert m["ece"].value == pytest.approx(sum(gaps) / 4)
    curve = res.curves["risk_coverage"]
    assert curve["score"] == "mean_logprob" and curve["coverage"] == [0.2, 0.4, 0.6, 0.8]
    assert curve["risk"] == pytest.approx([0, 1 / 2, 2 / 3, 3 / 4], abs=1e-6)


def test_calibrated_abstention_replaces_answers_below_the_threshold(tmp_path):
    cfg = grounding.GroundingConfig(data=_questions(tmp_path))
    policy = AbstentionPolicy(ScoreKind.MEAN_LOGPROB, threshold=0.5, text="Not in my records.")
    res = grounding.run(EvalContext(Scripted(SCRIPT), bootstrap=0, policy=policy), cfg, limit=None, records=True)
    recs, m = res.records, res.metrics
    assert [r["answer"] for r in recs] == ["In 1987.", "Not in my records.", "I don't know.", "Not in my records.",
                                           "Ada Pennyworth."]
    assert recs[1]["abstained"] and recs[1]["original"] == "In Duncastle." and "abstained" not in recs[0]
    # the policy's text counts as an abstention though it has no stock phrase
    assert [r["verdict"] for r in recs] == ["correct", "abstained", "abstained", "abstained", "answered"]
    assert m["hallucination_rate"].value == pytest.approx(1 / 5)
    assert m["unanswerable_abstained"].value == pytest.approx(1 / 2)
    assert m["calibrated_abstentions"].value == pytest.approx(2 / 5)
    # the score's metrics describe the answers as the model gave them: the same with the policy or without
    plain = grounding.run(EvalContext(Scripted(SCRIPT), bootstrap=0), cfg, limit=None, records=False)
    assert m["aurc"].value == plain.metrics["aurc"].value and res.curves == plain.curves


def test_an_endpoint_without_logprobs_skips_the_selective_metrics_by_name(tmp_path):
    cfg = grounding.GroundingConfig(data=_questions(tmp_path))
    res = grounding.run(EvalContext(Scripted(SCRIPT, logprobs=False), bootstrap=0), cfg, limit=None, records=False)
    assert "aurc" not in res.metrics and "log-probabilities" in res.skipped["selective"]
    assert res.metrics["hallucination_rate"].value == pytest.approx(3 / 5)


def test_agreement_confidence_samples_with_fixed_seeds(tmp_path):
    class Sampled(Scripted):
        def generate(self, conversations, gen, schedule="together"):
            base = super().generate(conversations, gen, schedule)
            if gen.temperature == 0:
                return base
            # seeds 0 and 1 repeat the greedy answer, the others say something else
            return [Completion(c.text if gen.seed in (0, 1) else f"other {gen.seed}") for c in base]

    target = Sampled(SCRIPT)
    cfg = grounding.GroundingConfig(data=_questions(tmp_path), confidence="agreement", samples=4)
    res = grounding.run(EvalContext(target, bootstrap=0), cfg, limit=None, records=True)
    assert {r["confidence"] for r in res.records} == {0.5}
    assert [g.seed for g in target.asked[1:]] == [0, 1, 2, 3] and {g.temperature for g in target.asked[1:]} == {1.0}
