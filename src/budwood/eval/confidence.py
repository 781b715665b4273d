"""How confident a model is in an answer it generated, and the policy that abstains below a threshold.

Three scores, each a number in [0, 1] so one threshold and one calibration error read the same way:

- mean_logprob: exp(mean token log-probability of the answer), the geometric mean of its tokens'
  probabilities (end-of-turn token included: being sure the answer is over is part of being sure);
- min_logprob: exp(min token log-probability), the probability of its least likely token, which a
  single guessed number or name drags down however fluent the rest is;
- agreement: the share of `samples` answers sampled at temperature 1 (seeds 0..k-1) whose normalised
  text equals the answer's (Wang et al.'s self-consistency as a confidence); k extra generations, but
  it needs no log-probabilities, so it works on any endpoint.

Log-probabilities are the model's own (before temperature and penalties), as the engine reports them,
so a sampled answer is scored by the same distribution as a greedy one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum

from budwood.eval.scoring import normalize

AGREEMENT_TEMPERATURE = 1.0


class ScoreKind(StrEnum):
    MEAN_LOGPROB = "mean_logprob"
    MIN_LOGPROB = "min_logprob"
    AGREEMENT = "agreement"

    @property
    def needs_logprobs(self) -> bool:
        return self is not ScoreKind.AGREEMENT


def agreement_seeds(samples: int) -> list[int]:
    """The seeds of the agreement score's samples: fixed, so eval and serve score an answer alike."""
    return list(range(samples))


@dataclass(frozen=True)
class Answer:
    """A generated answer and its confidence (None where the target cannot give one). Under an
    abstention policy `abstained` says the text was replaced; `original` keeps what the model said."""

    text: str
    confidence: float | None = None
    abstained: bool = False
    original: str | None = None


def logprob_confidence(token_logprobs: list[float], kind: ScoreKind) -> float:
    """exp(mean) or exp(min) of an answer's token log-probabilities; an answer of no tokens scores 0."""
    if not token_logprobs:
        return 0.0
    if kind is ScoreKind.MEAN_LOGPROB:
        return math.exp(sum(token_logprobs) / len(token_logprobs))
    if kind is ScoreKind.MIN_LOGPROB:
        return math.exp(min(token_logprobs))
    raise ValueError(f"{kind} is not a log-probability score")


def agreement(answer: str, samples: list[str]) -> float:
    """Share of the sampled answers that say the same as `answer` once normalised (scoring.normalize)."""
    norm = normalize(answer)
    return sum(normalize(s) == norm for s in samples) / len(samples) if samples else 0.0


@dataclass(frozen=True)
class AbstentionPolicy:
    """Answer with `text` instead of any answer whose `score` confidence is below `threshold`."""

    score: ScoreKind
    threshold: float
    text: str
    samples: int = 0  # agreement only

    def abstains(self, confidence: float) -> bool:
        return confidence < self.threshold

    def apply(self, answers: list[Answer]) -> list[Answer]:
        out = []
        for a in answers:
            if a.confidence is None:
                raise ValueError("an answer without a confidence cannot be held to a threshold")
            out.append(replace(a, text=self.text, abstained=True, original=a.text)
                       if self.abstains(a.confidence) else a)
        return out
