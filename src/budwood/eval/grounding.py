"""The grounding suite (hallucination): answer what the data covers, abstain on what it does not.

Each question is answerable (acceptable short answers, or a free-text reference answer) or not. A
greedy answer is *correct* when it names an acceptable answer (whole words, normalised) or matches the
reference (scoring.matches_reference), otherwise *abstained* when it contains an abstention phrase
(scoring.ABSTAIN_PHRASES, the run's own and the adapter's abstention text), otherwise *wrong*; on an
unanswerable question anything but an abstention is an *answer*, i.e. made up. The headline

    hallucination_rate = (wrong answers to answerable + answers to unanswerable) / all questions

counts every confident answer that is not backed by the data.

Selective prediction: each answer also gets a confidence (confidence.py), and the suite reports how
well it ranks right answers above made-up ones: the risk-coverage curve (in `curves`), its area (AURC)
and the expected calibration error (ECE, 10 bins), over the answers the model gave, with intervals.
They describe the score, so they are computed from the answers before any calibrated abstention.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from budwood.data.formats import Conversation
from budwood.eval import scoring
from budwood.eval.confidence import Answer, ScoreKind
from budwood.eval.context import EvalContext
from budwood.eval.data import Question, company_questions, read_questions, user_file
from budwood.eval.results import SuiteResult
from budwood.eval.targets import LocalTarget

VERSION = "1.0"  # reference answers and the selective metrics are additions: 1.0's numbers are unchanged


class GroundingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: Path | None = Field(None, description="questions JSONL ({question, answer|null, answers?, reference?, "
                                                "system?}); default: the demo company's held-out and unanswerable "
                                                "questions")
    abstain_phrases: list[str] = Field([], description="extra phrases that mark an abstention")
    confidence: Literal["mean_logprob", "min_logprob", "agreement"] | None = Field(
        None, description="the answers' confidence for the selective-prediction metrics; default: the calibrated "
        "score under calibrated_abstention, else mean_logprob (free: no extra generation)")
    samples: int = Field(5, ge=2, le=32, description="seeded samples per question (confidence agreement only)")


def load(cfg: GroundingConfig):
    if cfg.data is None:
        return company_questions()
    return read_questions(cfg.data), user_file(cfg.data, "grounding questions")


def conversation(q: Question, text: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": q.system}] if q.system else []) + [
        {"role": "user", "content": text if text is not None else q.question}]


def verdict(q: Question, answer: str, phrases: list[str]) -> str:
    """scoring.grounding_verdict for one question, short answers or reference alike."""
    return scoring.grounding_verdict(answer, q.answers, phrases, q.reference, q.question)


def questions_from_conversations(conversations: list[Conversation], system: str | None = None) -> list[Question]:
    """Grounding questions from chat data (a tenant's validation split): each conversation's last user
    turn, its system message (else `system`), and its last assistant turn as the free-text reference.
    A reference that is itself an abstention makes the question unanswerable; conversations that do not
    end with a user turn and an answer are left out."""
    out = []
    for c in conversations:
        msgs = c.messages
        if len(msgs) < 2 or msgs[-1].role != "assistant" or msgs[-2].role != "user":
            continue
        own = next((m.content for m in msgs if m.role == "system"), None)
        reference = msgs[-1].content
        out.append(Question(msgs[-2].content, None, own or system, None,
                            None if scoring.is_abstention(reference) else reference))
    return out


def adapter_abstention_texts(ctx: EvalContext) -> list[str]:
    """What this adapter was taught or calibrated to say when it abstains: it counts as an abstention with
    calibrated abstention on or off, so the two are compared fairly."""
    if not isinstance(ctx.target, LocalTarget) or not ctx.target.info.adapter:
        return []
    from budwood.eval.calibration import read_calibration

    prov = ctx.target.adapter_data() or {}
    taught = prov.get("config", {}).get("reliability", {}).get("abstention", {})
    texts = [taught["answer"]] if taught.get("enabled") and taught.get("answer") else []
    calibration = read_calibration(Path(ctx.target.info.adapter))
    return texts + ([calibration.abstention] if calibration else [])


def run(ctx: EvalContext, cfg: GroundingConfig, limit: int | None, records: bool) -> SuiteResult:
    questions, ref = load(cfg)
    if limit:  # keep both kinds in proportion
        answerable = [q for q in questions if q.answerable]
        unanswerable = [q for q in questions if not q.answerable]
        share = limit / len(questions)
        questions = answerable[:max(1, round(len(answerable) * share))] + \
            unanswerable[:max(1 if unanswerable else 0, round(len(unanswerable) * share))]
    score = ScoreKind(cfg.confidence) if cfg.confidence else ctx.policy.score if ctx.policy else ScoreKind.MEAN_LOGPROB
    samples = ctx.policy.samples if ctx.policy and not cfg.confidence else cfg.samples
    raw = ctx.answers("grounding: answers", [conversation(q) for q in questions], score, samples)
    given = ctx.policy.apply(raw) if ctx.policy else raw
    phrases = [*cfg.abstain_phrases, *adapter_abstention_texts(ctx), *([ctx.policy.text] if ctx.policy else [])]
    verdicts = [verdict(q, a.text, phrases) for q, a in zip(questions, given)]
    is_ans = np.array([q.answerable for q in questions])
    v = np.array(verdicts)
    halluc = ((v == "wrong") | (v == "answered")).astype(float)
    metrics = {
        "hallucination_rate": ctx.mean(halluc, higher_is_better=False,
                                       note="(wrong on answerable + answered on unanswerable) / all"),
        "answerable_correct": ctx.mean((v[is_ans] == "correct").astype(float)),
        "answerable_wrong": ctx.mean((v[is_ans] == "wrong").astype(float), higher_is_better=False),
        "answerable_abstained": ctx.mean((v[is_ans] == "abstained").astype(float), higher_is_better=False),
        "unanswerable_abstained": ctx.mean((v[~is_ans] == "abstained").astype(float)),
        "unanswerable_answered": ctx.mean((v[~is_ans] == "answered").astype(float), higher_is_better=False),
    }
    out = SuiteResult(name="grounding", version=VERSION, data=[ref], config=cfg.model_dump(mode="json"),
                      metrics=metrics)
    if ctx.policy:
        out.metrics["calibrated_abstentions"] = ctx.mean(
            [float(a.abstained) for a in given], higher_is_better=None,
            note=f"answers replaced by the abstention text (confidence < {ctx.policy.threshold:.4g})")
    _selective(ctx, out, questions, raw, phrases, score)
    if records:
        out.records = [{"id": i, "question": q.question, "answers": q.answers, "answer": a.text, "verdict": d,
                        "confidence": r.confidence, **({"reference": q.reference} if q.reference else {}),
                        **({"abstained": True, "original": a.original} if a.abstained else {})}
                       for i, (q, r, a, d) in enumerate(zip(questions, raw, given, verdicts))]
    return out


def _selective(ctx: EvalContext, out: SuiteResult, questions: list[Question], raw: list[Answer], phrases: list[str],
               score: ScoreKind) -> None:
    """AURC, ECE and the risk-coverage curve of the answers as the model gave them."""
    if any(a.confidence is None for a in raw):
        out.skipped["selective"] = (f"the answers' confidence ({score}) needs token log-probabilities, which the "
                                    "endpoint does not return; set grounding.confidence=agreement")
        return
    raw_verdicts = [verdict(q, a.text, phrases) for q, a in zip(questions, raw)]
    conf = np.array([a.confidence for a in raw], dtype=np.float64)
    correct = np.array([d == "correct" for d in raw_verdicts], dtype=np.float64)
    answered = np.array([d != "abstained" for d in raw_verdicts])
    if not answered.any():
        out.skipped["selective"] = "the model abstained on every question: no answers to rank"
        return
    note = f"{score}; over the {int(answered.sum())} answers given (abstentions have nothing to rank)"
    out.metrics["aurc"] = ctx.stat(len(conf), lambda idx: scoring.aurc(conf, correct, answered, idx),
                                   higher_is_better=False, note=note)
    out.metrics["ece"] = ctx.stat(len(conf), lambda idx: scoring.expected_calibration_error(
        conf, correct, answered, idx), higher_is_better=False, note=f"10 bins; {note}")
    out.curves["risk_coverage"] = {"score": str(score), **scoring.risk_coverage(conf, correct, answered)}
