"""What every suite gets: the target, the run's settings, progress reporting and metric builders."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from budwood.eval import scoring
from budwood.eval.confidence import (
    AGREEMENT_TEMPERATURE,
    AbstentionPolicy,
    Answer,
    ScoreKind,
    agreement,
    agreement_seeds,
    logprob_confidence,
)
from budwood.eval.results import Metric, Timing
from budwood.eval.targets import Gen, LocalTarget, LogLik, OpenAITarget, Schedule


class Progress(Protocol):
    def start(self, label: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def stop(self) -> None: ...


class NoProgress:
    def start(self, label: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def stop(self) -> None: ...


@dataclass
class EvalContext:
    target: LocalTarget | OpenAITarget
    seed: int = 0
    bootstrap: int = 1000
    max_tokens: int = 64
    chunk: int = 256  # requests handed to the target at once (bounds memory, paces the progress bar)
    progress: Progress = field(default_factory=NoProgress)
    policy: AbstentionPolicy | None = None  # calibrated abstention: every generated answer is held to it
    requests: int = 0
    started: float = field(default_factory=time.perf_counter)

    # -- running work with progress --------------------------------------------------------------
    def chat(self, label: str, conversations: list[list[dict]], gen: Gen | None = None,
             schedule: Schedule = "together", chunk: int | None = None) -> list[str]:
        """The target's answers; under a policy, those below its threshold replaced by its text."""
        gen = gen or Gen(max_tokens=self.max_tokens)
        if self.policy is None:
            return self._chunked(label, conversations, lambda part: self.target.chat(part, gen, schedule), chunk)
        answers = self.answers(label, conversations, self.policy.score, self.policy.samples, gen, schedule, chunk)
        return [a.text for a in self.policy.apply(answers)]

    def answers(self, label: str, conversations: list[list[dict]], score: ScoreKind, samples: int = 0,
                gen: Gen | None = None, schedule: Schedule = "together", chunk: int | None = None) -> list[Answer]:
        """The target's answers with their confidence (confidence.py), none replaced; a confidence is None
        where the target returns no log-probabilities. Agreement costs `samples` extra generations."""
        gen = gen or Gen(max_tokens=self.max_tokens)
        if score.needs_logprobs:
            asked = Gen(gen.temperature, gen.max_tokens, gen.seed, logprobs=True)
            done = self._chunked(label, conversations, lambda part: self.target.generate(part, asked, schedule),
                                 chunk)
            return [Answer(c.text, None if c.token_logprobs is None else logprob_confidence(c.token_logprobs, score))
                    for c in done]
        texts = self._chunked(label, conversations, lambda part: self.target.chat(part, gen, schedule), chunk)
        drawn = []
        for i, seed in enumerate(agreement_seeds(samples)):
            sampled = Gen(AGREEMENT_TEMPERATURE, gen.max_tokens, seed)
            drawn.append(self._chunked(f"{label}: sample {i + 1}/{samples}", conversations,
                                       lambda part, g=sampled: self.target.chat(part, g), chunk))
        return [Answer(t, agreement(t, [d[i] for d in drawn])) for i, t in enumerate(texts)]

    def loglikelihood(self, label: str, pairs: list[tuple[str, str]]) -> list[LogLik]:
        return self._chunked(label, pairs, self.target.loglikelihood)

    def chat_loss(self, label: str, conversations: list[list[dict]]) -> list[tuple[float, int]]:
        return self._chunked(label, conversations, self.target.chat_loss)

    def _chunked(self, label: str, items: list, fn: Callable[[list], list], chunk: int | None = None) -> list:
        chunk = chunk or self.chunk
        self.progress.start(label, len(items))
        out: list = []
        try:
            for i in range(0, len(items), chunk):
                out += fn(items[i:i + chunk])
                self.progress.advance(min(chunk, len(items) - i))
        finally:
            self.progress.stop()
        self.requests += len(items)
        return out

    def timing(self) -> Timing:
        return Timing(seconds=round(time.perf_counter() - self.started, 3), requests=self.requests)

    # -- metrics ---------------------------------------------------------------------------------
    def mean(self, values: Sequence[float], higher_is_better: bool | None = True, note: str | None = None) -> Metric:
        arr = np.asarray(values, dtype=np.float64)
        if arr.size == 0:
            return Metric(value=None, n=0, higher_is_better=higher_is_better, note=note or "no examples")
        return Metric(value=float(arr.mean()), ci=scoring.mean_ci(arr, self.bootstrap, self.seed), n=int(arr.size),
                      higher_is_better=higher_is_better, note=note)

    def ratio(self, num: Sequence[float], den: Sequence[float], higher_is_better: bool | None = True,
              note: str | None = None) -> Metric:
        a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
        if a.size == 0 or b.sum() == 0:
            return Metric(value=None, n=int(a.size), higher_is_better=higher_is_better, note=note or "no examples")
        return Metric(value=float(a.sum() / b.sum()), ci=scoring.ratio_ci(a, b, self.bootstrap, self.seed),
                      n=int(a.size), higher_is_better=higher_is_better, note=note)

    def stat(self, n: int, fn: Callable[[np.ndarray], np.ndarray], higher_is_better: bool | None = None,
             note: str | None = None) -> Metric:
        """A metric computed by `fn` from an index matrix (rows = resamples); row 0 of arange is the value."""
        if n == 0:
            return Metric(value=None, n=0, higher_is_better=higher_is_better, note=note or "no examples")
        value = float(np.asarray(fn(np.arange(n)[None, :]))[0])
        return Metric(value=value, ci=scoring.bootstrap_ci(n, fn, self.bootstrap, self.seed), n=n,
                      higher_is_better=higher_is_better, note=note)
