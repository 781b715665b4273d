"""The grounding suite (hallucination): answer what the data covers, abstain on what it does not.

Each question is answerable (acceptable answers given) or not (answer null). A greedy answer is
*correct* when it names an acceptable answer (whole words, normalised), otherwise *abstained* when it
contains an abstention phrase (scoring.ABSTAIN_PHRASES plus the run's own), otherwise *wrong*; on an
unanswerable question anything but an abstention is an *answer*, i.e. made up. The headline

    hallucination_rate = (wrong answers to answerable + answers to unanswerable) / all questions

counts every confident answer that is not backed by the data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from budwood.eval import scoring
from budwood.eval.context import EvalContext
from budwood.eval.data import Question, company_questions, read_questions, user_file
from budwood.eval.results import SuiteResult

VERSION = "1.0"


class GroundingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: Path | None = Field(None, description="questions JSONL ({question, answer|null, answers?, system?}); "
                                                "default: the demo company's held-out and unanswerable questions")
    abstain_phrases: list[str] = Field([], description="extra phrases that mark an abstention")


def load(cfg: GroundingConfig):
    if cfg.data is None:
        return company_questions()
    return read_questions(cfg.data), user_file(cfg.data, "grounding questions")


def conversation(q: Question, text: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": q.system}] if q.system else []) + [
        {"role": "user", "content": text if text is not None else q.question}]


def run(ctx: EvalContext, cfg: GroundingConfig, limit: int | None, records: bool) -> SuiteResult:
    questions, ref = load(cfg)
    if limit:  # keep both kinds in proportion
        answerable = [q for q in questions if q.answers]
        unanswerable = [q for q in questions if not q.answers]
        share = limit / len(questions)
        questions = answerable[:max(1, round(len(answerable) * share))] + \
            unanswerable[:max(1 if unanswerable else 0, round(len(unanswerable) * share))]
    answers = ctx.chat("grounding: answers", [conversation(q) for q in questions])
    verdicts = [scoring.grounding_verdict(a, q.answers, cfg.abstain_phrases) for q, a in zip(questions, answers)]
    is_ans = np.array([bool(q.answers) for q in questions])
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
    if records:
        out.records = [{"id": i, "question": q.question, "answers": q.answers, "answer": a, "verdict": d}
                       for i, (q, a, d) in enumerate(zip(questions, answers, verdicts))]
    return out
