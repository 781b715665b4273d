"""Calibrated abstention: a confidence threshold, fitted on the adapter's validation split, below which
the adapter answers with its abstention text instead of a likely wrong answer.

Fitting answers each validation question greedily, scores each answer's confidence (confidence.py),
and judges it against the reference assistant answer (scoring.matches_reference). Among the answers
the model gave (its own abstentions are neither kept nor wrong), the threshold is the lowest
confidence at which the answers kept are right at least `target_precision` of the time: the most
answers for that precision. The result, with its precision and coverage and their 95% intervals, is
`calibration.json` in the adapter folder, which `budwood eval` (calibrated_abstention) and `budwood
serve` (the request field calibrated_abstention) read.
"""
from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from budwood.data.formats import Conversation, read_dataset
from budwood.errors import BudwoodError, DataError
from budwood.eval import scoring
from budwood.eval.confidence import AbstentionPolicy, ScoreKind
from budwood.eval.context import EvalContext, NoProgress, Progress
from budwood.eval.data import user_file
from budwood.eval.results import DataRef, Metric
from budwood.eval.targets import LocalTarget

if TYPE_CHECKING:
    from budwood.config import CalibrationConfig, TrainConfig

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
FORMAT = "budwood.calibration/1"
MAX_TOKENS = 64  # the grounding and domain suites' answer length


class Calibration(BaseModel):
    """calibration.json: the threshold, how it was fitted, and what it achieved on held-out data."""

    model_config = ConfigDict(extra="forbid")
    version: str = FORMAT
    score: ScoreKind = Field(description="the confidence (confidence.py): mean_logprob | min_logprob | agreement")
    samples: int | None = Field(None, description="seeded samples per answer (agreement only)")
    threshold: float = Field(description="answers with confidence below it are replaced by `abstention`")
    target_precision: float
    reached: bool = Field(description="whether some threshold reached target_precision on the validation split")
    precision: Metric = Field(description="share of the answers kept at the threshold that are right")
    coverage: Metric = Field(description="share of the validation questions answered (not abstained) at it")
    n: int = Field(description="validation questions")
    answered: int = Field(description="of them, answers that were not already abstentions")
    abstention: str = Field(description="the abstention text")
    default: bool = Field(True, description="whether budwood serve applies it to requests that do not say "
                                            "(calibrated_abstention null)")
    criterion: str = Field(scoring.REFERENCE_CRITERION, description="how answers were judged right")
    max_tokens: int = MAX_TOKENS
    adapter_fingerprint: str = Field(description="the weights it was fitted on (models.fingerprint)")
    base: str
    data: DataRef
    created: str
    warning: str | None = None

    def policy(self) -> AbstentionPolicy:
        return AbstentionPolicy(self.score, self.threshold, self.abstention, self.samples or 0)


def read_calibration(adapter_dir: Path) -> Calibration | None:
    """The adapter's calibration, None when it has none; a damaged file is an error naming it."""
    path = Path(adapter_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        return Calibration.model_validate_json(path.read_text())
    except ValidationError as e:
        first = e.errors()[0]
        raise BudwoodError(f"{path}: not a budwood calibration file ({'.'.join(map(str, first['loc']))}: "
                           f"{first['msg']})") from None


def load_calibration(adapter_dir: Path, fingerprint: str | None = None, param: str = "calibrated_abstention"
                     ) -> Calibration:
    """The adapter's calibration, required (`param` names what asked for it: a missing one is a bad request,
    400, not a missing model); with `fingerprint`, also checked to be for these weights."""
    found = read_calibration(adapter_dir)
    if found is None:
        raise BudwoodError(f"{param}: the adapter {adapter_dir} has no {CALIBRATION_FILE}; make one with "
                            f"`budwood calibrate {adapter_dir}` (or train with reliability.calibration=true)",
                            param=param, code="calibration_not_found")
    if fingerprint is not None and found.adapter_fingerprint != fingerprint:
        raise BudwoodError(f"{param}: {Path(adapter_dir) / CALIBRATION_FILE} was fitted on other weights than the "
                           f"adapter's now; run `budwood calibrate {adapter_dir}` again", param=param,
                           code="calibration_stale")
    return found


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, answered: np.ndarray,
                     target_precision: float) -> tuple[float, bool]:
    """(threshold, reached): the lowest confidence among the answers given at which the answers kept
    (confidence >= it) are right at least `target_precision` of the time; if none is, the one of best
    precision (the lowest of equals) and False. No answers given: (0.0, False)."""
    conf, right = confidence[answered], correct[answered].astype(np.float64)
    if conf.size == 0:
        return 0.0, False
    order = np.argsort(-conf, kind="stable")
    conf, right = conf[order], right[order]
    precision = np.cumsum(right) / np.arange(1, conf.size + 1)
    last = np.r_[conf[1:] != conf[:-1], True]  # keeping all answers of equal confidence together
    candidates = np.flatnonzero(last)
    ok = candidates[precision[candidates] >= target_precision - 1e-12]
    if ok.size:
        return float(conf[ok[-1]]), True
    best = candidates[precision[candidates] == precision[candidates].max()]
    return float(conf[best[-1]]), False


def judge(answer: str, reference: str, question: str, abstention: str) -> str:
    """'correct', 'wrong' or 'abstained' against a reference answer; a reference that is itself an
    abstention makes every non-abstaining answer wrong."""
    phrases = [abstention]
    if scoring.is_abstention(reference, phrases):
        return "abstained" if scoring.is_abstention(answer, phrases) else "wrong"
    return scoring.grounding_verdict(answer, None, phrases, reference, question)


def calibrate(adapter_dir: Path, base: str, settings: CalibrationConfig, abstention: str, data: Path | None = None,
              *, default: bool = False, precision: str = "fp32", device: str = "auto",
              progress: Progress | None = None) -> Path:
    """Fit the threshold on the adapter's validation split (or `data`, chat JSONL in any training format)
    and write calibration.json beside the weights. Returns its path."""
    adapter_dir = Path(adapter_dir)
    convs, ref = _validation(adapter_dir, data)  # before loading weights: a data problem is said at once
    with_tools = sum(c.uses_tools for c in convs)
    convs = [c for c in convs if not c.uses_tools]  # their answers are calls or come from tool results
    if not convs:
        raise DataError(f"{ref.path}: every held-out example uses tools; calibration fits its threshold on text "
                        "answers to prompts without tools: pass such examples with --data FILE")
    target = LocalTarget(f"{base}+{adapter_dir}", precision, device)
    ctx = EvalContext(target, max_tokens=MAX_TOKENS, progress=progress or NoProgress())
    prompts = [[{"role": m.role, "content": m.content} for m in c.messages[:-1]] for c in convs]
    kind = ScoreKind(settings.score)
    samples = settings.samples if kind is ScoreKind.AGREEMENT else 0
    answers = ctx.answers("calibration: validation answers", prompts, kind, samples)
    verdicts = [judge(a.text, c.messages[-1].content, _question(c), abstention) for a, c in zip(answers, convs)]
    conf = np.array([a.confidence for a in answers], dtype=np.float64)
    correct = np.array([v == "correct" for v in verdicts])
    answered = np.array([v != "abstained" for v in verdicts])
    threshold, reached = choose_threshold(conf, correct, answered, settings.target_precision)
    kept = answered & (conf >= threshold)
    notes = []
    if not reached:
        notes.append(f"no threshold reaches precision {settings.target_precision} on the {len(convs)} validation "
                     f"questions ({int(answered.sum())} answered); the threshold of best precision is used")
    if with_tools:
        notes.append(f"{with_tools} validation example(s) that use tools were left out (calibration judges text "
                     "answers)")
    warning = "; ".join(notes) or None
    if warning:
        log.warning("%s: %s", adapter_dir, warning)
    calibration = Calibration(
        score=kind, samples=samples or None, threshold=threshold, target_precision=settings.target_precision,
        reached=reached, precision=ctx.ratio((correct & kept).astype(float), kept.astype(float)),
        coverage=ctx.mean(kept.astype(float)), n=len(convs), answered=int(answered.sum()), abstention=abstention,
        default=default, adapter_fingerprint=target.info.adapter_fingerprint or "", base=base, data=ref,
        created=datetime.now(UTC).isoformat(timespec="seconds"), warning=warning)
    path = adapter_dir / CALIBRATION_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(calibration.model_dump_json(indent=1) + "\n")
    tmp.replace(path)
    return path


def calibrate_adapter(adapter_dir: Path, config: TrainConfig, progress: Progress | None = None) -> Path:
    """After training (config.reliability.calibration enabled): fit on the run's validation split with
    the recipe's settings and the abstention recipe's answer as the abstention text."""
    reliability = config.reliability
    return calibrate(adapter_dir, config.base_model, reliability.calibration, reliability.abstention.answer,
                     default=reliability.calibration.default, device=config.training.device, progress=progress)


def _validation(adapter_dir: Path, data: Path | None) -> tuple[list[Conversation], DataRef]:
    from budwood.artifacts import AdapterDir
    from budwood.eval.domain import adapter_validation

    if data is not None:
        ds = read_dataset(data)
        convs = [e if isinstance(e, Conversation) else e.conversations()[0] for e in ds.examples]
        found = ([c for c in convs if len(c.messages) > 1 and c.messages[-1].role == "assistant"],
                 user_file(data, "calibration set"))
    else:
        found = adapter_validation(AdapterDir.open(adapter_dir).provenance,
                                   hint=f"budwood calibrate {adapter_dir} --data FILE")
    if found is None:
        raise DataError(f"{adapter_dir}: calibration needs held-out answers and the adapter was trained without a "
                        "validation split (data.validation or data.validation_split); pass one with --data FILE")
    if not found[0]:
        raise DataError(f"{data}: no example ends with an assistant answer to calibrate on")
    return found


def _question(c: Conversation) -> str:
    return next((m.content for m in reversed(c.messages[:-1]) if m.role == "user"), "")
