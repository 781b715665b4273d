"""The domain suite: does the model give the answers of the user's own held-out data?

Each example is a conversation in any training format; the last assistant turn is the reference and
everything before it the prompt. Examples that use tools (offer them, call them, or answer a tool result) are
left out and counted under `skipped`: their prompts are not text alone, and the tools suite scores them.
Generated answers (greedy) are scored by exact match, token F1 and ROUGE-L; on local targets the reference's
loss and perplexity are computed as training counts them.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from budwood.data.formats import Conversation, Message, data_fingerprint, read_dataset
from budwood.errors import DataError
from budwood.eval import scoring
from budwood.eval.context import EvalContext
from budwood.eval.data import user_file
from budwood.eval.results import DataRef, Metric, SuiteResult
from budwood.eval.targets import LocalTarget

VERSION = "1.0"


class DomainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: Path | None = Field(None, description="eval JSONL in a training format; default: the adapter's "
                                                "validation split, else the demo company's held-out questions")
    format: str = "auto"


def run(ctx: EvalContext, cfg: DomainConfig, limit: int | None, records: bool) -> SuiteResult:
    convs, ref = _examples(ctx, cfg)
    with_tools = sum(c.uses_tools for c in convs)
    convs = [c for c in convs if not c.uses_tools]
    if with_tools and not convs and cfg.data is not None:
        raise DataError(f"{cfg.data}: every example uses tools; the domain suite scores text answers to prompts "
                        "without tools: evaluate this file with the tools suite (--suite tools --set "
                        f"tools.data={cfg.data})")
    convs = convs[:limit] if limit else convs
    prompts = [[{"role": m.role, "content": m.content} for m in c.messages[:-1]] for c in convs]
    references = [c.messages[-1].content for c in convs]
    answers = ctx.chat("domain: answers", prompts)
    em = [scoring.exact_match(a, r) for a, r in zip(answers, references)]
    f1 = [scoring.token_f1(a, r) for a, r in zip(answers, references)]
    rl = [scoring.rouge_l(a, r) for a, r in zip(answers, references)]
    metrics = {"exact_match": ctx.mean(em), "token_f1": ctx.mean(f1), "rouge_l": ctx.mean(rl)}
    skipped = {}
    if with_tools:
        skipped["tool_examples"] = (f"{with_tools} example(s) that use tools left out: the tools suite scores them "
                                    "(--suite tools)")
    losses: list[tuple[float, int]] = []
    if isinstance(ctx.target, LocalTarget):
        whole = [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, references)]
        losses = ctx.chat_loss("domain: loss", whole)
        nll = [-lp for lp, _ in losses]
        tokens = [n for _, n in losses]
        metrics["loss"] = ctx.ratio(nll, tokens, higher_is_better=False, note="mean nats per answer token")
        loss = metrics["loss"]
        metrics["perplexity"] = Metric(value=math.exp(loss.value) if loss.value is not None else None,
                                       ci=tuple(math.exp(x) for x in loss.ci) if loss.ci else None, n=loss.n,
                                       higher_is_better=False)
    else:
        skipped["loss"] = "loss and perplexity need the model's chat template and weights: local targets only"
    out = SuiteResult(name="domain", version=VERSION, data=[ref], config=cfg.model_dump(mode="json"),
                      metrics=metrics, skipped=skipped)
    if records:
        out.records = [{"id": i, "prompt": p, "reference": r, "answer": a, "exact_match": e, "token_f1": f,
                        "rouge_l": g, **({"logprob": losses[i][0], "tokens": losses[i][1]} if losses else {})}
                       for i, (p, r, a, e, f, g) in enumerate(zip(prompts, references, answers, em, f1, rl))]
    return out


def _examples(ctx: EvalContext, cfg: DomainConfig) -> tuple[list[Conversation], DataRef]:
    if cfg.data is not None:
        ds = read_dataset(cfg.data, cfg.format)
        return _usable(ds.conversations, str(cfg.data)), user_file(cfg.data, "domain eval set")
    split = adapter_validation(ctx.target.adapter_data() if isinstance(ctx.target, LocalTarget) else None)
    if split is not None:
        return split
    from budwood.eval.data import company_questions

    questions, ref = company_questions()
    convs = [Conversation([*_sys(q.system), Message("user", q.question), Message("assistant", q.answers[0])])
             for q in questions if q.answers]
    return convs, ref


def adapter_validation(prov: dict | None, hint: str = "--set domain.data=FILE"
                       ) -> tuple[list[Conversation], DataRef] | None:
    """The held-out split the adapter was trained beside, rebuilt from its provenance (budwood.json) as
    training built it and checked against the fingerprint training recorded (None without an adapter or
    a split). Preference pairs become their prompt followed by the preferred answer. `hint` says how to
    pass the data instead when it is gone or changed."""
    val = (prov or {}).get("data", {}).get("validation")
    if not val:
        return None
    path = Path(val["path"])
    if not path.is_file():
        raise DataError(f"the adapter's validation data {path} is gone; pass it with {hint}")
    data_cfg = prov["config"]["data"]
    examples = read_dataset(path, data_cfg.get("format", "auto")).examples
    if val.get("split"):
        order = list(range(len(examples)))
        random.Random(prov["config"]["training"]["seed"]).shuffle(order)
        held = set(order[:max(1, round(len(examples) * val["split"]))])
        examples = [c for i, c in enumerate(examples) if i in held]
    if data_fingerprint(examples) != val["fingerprint"]:
        raise DataError(f"{path} changed since the adapter was trained (its fingerprint differs from the one in "
                        f"budwood.json); pass the data with {hint}")
    ref = user_file(path, "adapter validation split")
    ref.name += f" (split {val['split']})" if val.get("split") else ""
    convs = [e if isinstance(e, Conversation) else e.conversations()[0] for e in examples]
    return _usable(convs, str(path)), ref


def _usable(convs: list[Conversation], source: str) -> list[Conversation]:
    keep = [c for c in convs if c.messages[-1].role == "assistant" and len(c.messages) > 1]
    if not keep:
        raise DataError(f"{source}: no example ends with an assistant answer to score")
    return keep


def _sys(system: str | None) -> list[Message]:
    return [Message("system", system)] if system else []
