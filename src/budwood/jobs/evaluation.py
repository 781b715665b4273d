"""What a job's adapter is measured on: the tenant's own domain, never the demo company.

budwood eval's suites default to the demo company's questions, which say nothing about an adapter
trained on a library help desk's data. A job's evaluation is planned here instead, from its data:

- domain: the held-out examples that use no tools (the job's validation file, or the split it trained beside);
- grounding: the questions those held-out examples ask, and unanswerable ones that the abstention
  recipe builds from the tenant's data (questions that the training and held-out data support nowhere);
- reproducibility and bias's counterfactual probes: the same questions (the shipped TruthfulQA,
  ParaRel, CrowS-Pairs and BBQ parts are general benchmarks and stay as they are);
- tools: the held-out examples that offer tools (their last assistant turn the reference call, or text
  where no tool fits), scored as the Berkeley Function-Calling Leaderboard does;
- truthfulqa: general, as it is.
A suite that needs held-out data the job does not have is left out, with its reason in the job's
events, rather than measured on someone else's data.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from budwood.config import TrainConfig
from budwood.data.formats import Conversation, Example, data_fingerprint, read_dataset
from budwood.data.split import split_validation
from budwood.eval.data import Question

# the settings of each suite that name its data: set per job from the tenant's data, never by the service's config
DATA_SETTINGS = {"domain": "data", "grounding": "data", "reproducibility": "data", "bias": "counterfactual_data",
                 "tools": "data"}


@dataclass
class TenantData:
    """A job's examples as conversations (a preference pair as its prompt and preferred answer)."""

    held_out: list[Conversation]
    training: list[Conversation]
    source: str  # where held_out came from, for the job's events


@dataclass
class EvaluationPlan:
    suites: list[str]
    settings: dict  # budwood eval's settings, less target, precision and device
    left_out: dict[str, str] = field(default_factory=dict)  # suite -> why
    notes: list[str] = field(default_factory=list)  # what the tenant's questions are, for the job's events


def as_conversation(example: Example) -> Conversation:
    return example if isinstance(example, Conversation) else example.conversations()[0]


def tenant_data(config: TrainConfig, provenance: dict) -> TenantData:
    """The held-out examples the adapter never trained on (the validation file, or the training file's split
    rebuilt as training made it and checked against the fingerprint training recorded) and the rest."""
    dc = config.data
    examples = read_dataset(dc.train, dc.format).examples
    if dc.validation is not None:
        held = read_dataset(dc.validation, dc.format).examples
        return TenantData([as_conversation(e) for e in held], [as_conversation(e) for e in examples],
                          "the job's validation file")
    recorded = (provenance.get("data") or {}).get("validation")
    if not recorded or not recorded.get("split"):
        return TenantData([], [as_conversation(e) for e in examples], "no held-out data")
    kept, held = split_validation(examples, recorded["split"], config.training.seed)
    if data_fingerprint(held) != recorded["fingerprint"]:
        raise RuntimeError("the held-out split rebuilt for evaluation differs from the one training made "
                           f"(fingerprint {data_fingerprint(held)} != {recorded['fingerprint']})")
    return TenantData([as_conversation(e) for e in held], [as_conversation(e) for e in kept],
                      f"the {recorded['split']:.0%} of the training file held out from training")


def plan_evaluation(suites: list[str], settings: dict, data: TenantData, folder: Path, seed: int) -> EvaluationPlan:
    """The service's suites pointed at the tenant's data, written into `folder`; a suite whose data the job
    lacks is left out with its reason.

    Grounding asks what the held-out examples ask (their answers the references) and as many questions the
    tenant's data does not answer as the abstention recipe can build, at most one per answerable question so
    that neither side dominates the hallucination rate."""
    from budwood.eval.data import write_questions
    from budwood.eval.grounding import questions_from_conversations

    folder.mkdir(parents=True, exist_ok=True)
    plan = EvaluationPlan([], {name: dict(value) if isinstance(value, dict) else value
                               for name, value in settings.items()})
    asked, built = [], []
    tool_items = [c for c in data.held_out if c.tools and c.messages[-1].role == "assistant"]
    if tool_items:
        items = folder / "tool_items.jsonl"
        items.write_text("".join(json.dumps(c.canonical(), ensure_ascii=False) + "\n" for c in tool_items))
        _point(plan, "tools", items)
        plan.notes.append(f"tools: the {len(tool_items)} held-out examples that offer tools")
    texts = [c for c in data.held_out if not c.uses_tools]  # tool use is the tools suite's to score
    if texts:
        held_out = folder / "held_out.jsonl"
        held_out.write_text("".join(json.dumps(c.canonical(), ensure_ascii=False) + "\n" for c in texts))
        _point(plan, "domain", held_out)
        plan.notes.append(f"{len(texts)} held-out examples from {data.source}")
        asked = questions_from_conversations(texts)
        built = unanswerable_questions([c for c in data.training if not c.uses_tools] + texts,
                                       sum(q.answerable for q in asked), seed)
    answerable = sum(q.answerable for q in asked)
    if answerable:
        questions = write_questions(folder / "questions.jsonl", asked + built)
        for suite in ("grounding", "reproducibility", "bias"):
            _point(plan, suite, questions)
        plan.notes.append(f"grounding: the {len(asked)} questions they ask, {answerable} with an answer, and "
                          f"{len(built)} that the tenant's data does not answer")
    for suite in suites:
        why = _missing(suite, data, answerable, len(tool_items), len(texts))
        if why:
            plan.left_out[suite] = why
        else:
            plan.suites.append(suite)
    return plan


def _point(plan: EvaluationPlan, suite: str, path: Path) -> None:
    plan.settings[suite] = {**plan.settings.get(suite, {}), DATA_SETTINGS[suite]: str(path)}


def _missing(suite: str, data: TenantData, answerable: int, tool_items: int, texts: int) -> str | None:
    """Why `suite` cannot be measured on the tenant's data (its defaults would be the demo company's), or None
    for one it can, or a general benchmark."""
    if suite not in DATA_SETTINGS:
        return None
    if not data.held_out:
        return ("the job has no held-out data (no validation file, and the service holds none of the training "
                "file out: training.validation_split is 0)")
    if suite == "tools":
        return None if tool_items else f"no held-out example offers tools ({data.source})"
    if not texts:
        return f"every held-out example uses tools ({data.source}): the tools suite measures them"
    if suite != "domain" and not answerable:
        return f"no question with an answer could be made from {data.source}"
    return None


def unanswerable_questions(examples: list[Conversation], n: int, seed: int) -> list[Question]:
    """Up to n questions that none of `examples` answers, perturbed from their own questions as the abstention
    recipe builds its training questions (reliability/abstention.py), each with its source's system prompt."""
    from budwood.reliability import abstention
    from budwood.reliability.items import system

    candidates, _ = abstention.candidates(examples, seed)
    return [Question(c.question, None, system(examples[c.source])) for c in abstention.select(candidates, n, seed)]
