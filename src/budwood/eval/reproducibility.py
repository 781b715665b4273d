"""The reproducibility suite: the same question should get the same answer.

(a) Determinism: each prompt is answered alone, in batches of 8 with different neighbours, arriving
    while others are mid-answer (staggered; threads for remote targets) and repeated; greedy and
    seeded sampling. Metric: share of prompts whose outputs are identical in every condition.
(b) Format consistency (after FormatSpread, Sclar et al. 2024): K variants of each question (casing,
    whitespace, separators, template, paraphrase); per-variant accuracy, its spread (max - min) and
    the pairwise answer agreement. Option order: TruthfulQA questions as lettered multiple choice in
    three orders, scored by log-likelihood of the letter; agreement = the same option chosen every time.
(c) ParaRel (Elazar et al. 2021): facts queried through many paraphrased patterns; the object is
    picked by log-likelihood among the relation's frequent objects; consistency = pairwise agreement.
"""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from budwood.eval import scoring
from budwood.eval.context import EvalContext
from budwood.eval.data import Question, read_jsonl, shipped
from budwood.eval.grounding import GroundingConfig, conversation, verdict
from budwood.eval.grounding import load as load_questions
from budwood.eval.results import SuiteResult
from budwood.eval.targets import Gen

VERSION = "1.0"
LETTERS = "ABCD"


class ReproducibilityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: Path | None = Field(None, description="questions JSONL as for grounding; default: the demo company's")
    prompts: int = Field(16, ge=1, description="prompts for the determinism checks")
    repeats: int = Field(2, ge=1, description="extra repeats of the whole batch")
    format_questions: int = Field(16, ge=1)
    mc_questions: int = Field(24, ge=1, description="TruthfulQA questions for the option-order check")
    pararel_relations: int = Field(4, ge=1)
    pararel_subjects: int = Field(8, ge=1)
    pararel_candidates: int = Field(8, ge=2, description="most frequent objects of the relation scored as answers")
    sampling_temperature: float = 0.8


def variants(q: Question, paraphrases: list[str]) -> dict[str, list[dict]]:
    """The formats of one question, as conversations."""
    text = q.question
    out = {"original": conversation(q), "lowercase": conversation(q, text.lower()),
           "uppercase": conversation(q, text.upper()),
           "whitespace": conversation(q, "  " + "  ".join(text.split()) + " \n"),
           "separator": conversation(q, f"Question: {text}\nAnswer:"),
           "template": [{"role": "user", "content": (f"{q.system}\n\n" if q.system else "") + text}]}
    if paraphrases:
        out["paraphrase"] = conversation(q, paraphrases[0])
    return out


def run(ctx: EvalContext, cfg: ReproducibilityConfig, limit: int | None, records: bool) -> SuiteResult:
    questions, ref = load_questions(GroundingConfig(data=cfg.data))
    out = SuiteResult(name="reproducibility", version=VERSION, data=[ref], config=cfg.model_dump(mode="json"))
    recs: dict[str, list] = {}
    _determinism(ctx, cfg, questions[:limit or cfg.prompts], out, recs)
    _formats(ctx, [q for q in questions if q.answerable][:limit or cfg.format_questions], questions, out, recs)
    if ctx.target.can_score:
        _option_order(ctx, cfg, limit, out, recs)
        _pararel(ctx, cfg, limit, out, recs)
    else:
        why = "needs log-likelihoods; the endpoint does not return prompt log-probabilities"
        out.skipped.update({"option_order": why, "pararel": why})
    if records:
        out.records = [{"part": part, **r} for part, rows in recs.items() for r in rows]
    return out


def _determinism(ctx: EvalContext, cfg: ReproducibilityConfig, questions: list[Question], out: SuiteResult,
                 recs: dict) -> None:
    convs = [conversation(q) for q in questions]
    n = len(convs)
    for kind, gen in (("greedy", Gen(max_tokens=ctx.max_tokens)),
                      ("seeded", Gen(temperature=cfg.sampling_temperature, max_tokens=ctx.max_tokens, seed=1234))):
        runs = {"alone": ctx.chat(f"determinism ({kind}): alone", convs, gen, "one-by-one")}
        # batches of 8 with neighbours other than the full batch's: rotate, then cut
        shift = n // 2
        rotated = convs[shift:] + convs[:shift]
        batched = ctx.chat(f"determinism ({kind}): batch 8", rotated, gen, "together", chunk=8)
        runs["batch8"] = batched[n - shift:] + batched[:n - shift]
        order = list(range(n))
        random.Random(ctx.seed).shuffle(order)
        staggered = ctx.chat(f"determinism ({kind}): concurrent", [convs[i] for i in order], gen, "staggered")
        runs["concurrent"] = [staggered[order.index(i)] for i in range(n)]
        for r in range(cfg.repeats):
            runs[f"repeat{r + 1}"] = ctx.chat(f"determinism ({kind}): repeat {r + 1}", convs, gen, "together")
        same = [float(all(runs[c][i] == runs["alone"][i] for c in runs)) for i in range(n)]
        out.metrics[f"determinism_{kind}"] = ctx.mean(same, note="share of prompts with identical outputs in all "
                                                                 f"{len(runs)} conditions")
        for c in runs:
            if c != "alone":
                out.metrics[f"identical_{kind}_{c}"] = ctx.mean(
                    [float(runs[c][i] == runs["alone"][i]) for i in range(n)])
        recs.setdefault("determinism", []).extend(
            {"kind": kind, "id": i, "question": questions[i].question, "identical": bool(same[i]),
             "outputs": {c: runs[c][i] for c in runs}} for i in range(n))


def _formats(ctx: EvalContext, questions: list[Question], pool: list[Question], out: SuiteResult, recs: dict) -> None:
    by_group: dict[str, list[str]] = {}
    for q in pool:
        if q.group:
            by_group.setdefault(q.group, []).append(q.question)
    per_q = [variants(q, [p for p in by_group.get(q.group or "", []) if p != q.question]) for q in questions]
    names = list(dict.fromkeys(k for v in per_q for k in v))
    flat = [(i, k, conv) for i, v in enumerate(per_q) for k, conv in v.items()]
    answers = ctx.chat("formats: answers", [c for _, _, c in flat])
    by_q: dict[int, dict[str, str]] = {}
    for (i, k, _), a in zip(flat, answers):
        by_q.setdefault(i, {})[k] = a
    right = {i: {k: float(verdict(questions[i], a, []) == "correct") for k, a in v.items()} for i, v in by_q.items()}
    acc = {k: [right[i][k] for i in right if k in right[i]] for k in names}
    agree = [scoring.pairwise_agreement(list(by_q[i].values())) for i in sorted(by_q)]
    out.metrics["format_agreement"] = ctx.mean(agree, note="pairwise agreement of normalised answers across formats")
    for k in names:
        out.metrics[f"format_accuracy_{k}"] = ctx.mean(acc[k])
    # spread of accuracy across formats (FormatSpread), resampling questions present in every format
    common = [i for i in sorted(by_q) if all(k in by_q[i] for k in names)]
    mat = np.array([[right[i][k] for k in names] for i in common]).reshape(len(common), len(names))
    out.metrics["format_spread"] = ctx.stat(len(common), lambda idx: mat[idx].mean(axis=1).max(axis=1)
                                            - mat[idx].mean(axis=1).min(axis=1), higher_is_better=False,
                                            note="max - min accuracy over formats")
    recs["formats"] = [{"id": i, "question": questions[i].question, "answers": by_q[i]} for i in sorted(by_q)]


def _option_order(ctx: EvalContext, cfg: ReproducibilityConfig, limit: int | None, out: SuiteResult,
                  recs: dict) -> None:
    from budwood.eval.truthfulqa import load_docs

    docs, ref = load_docs()
    out.data.append(ref)
    docs = docs[:limit or cfg.mc_questions]
    rng = random.Random(ctx.seed)
    items = []  # (doc, order name, options in shown order)
    for d in docs:
        options = d["mc1"][:len(LETTERS)]  # the best answer first, then up to 3 incorrect
        shuffled = options[:]
        rng.shuffle(shuffled)
        for name, shown in (("original", options), ("reversed", options[::-1]), ("shuffled", shuffled)):
            items.append((d, name, shown))
    pairs = []
    for d, _, shown in items:
        listing = "\n".join(f"{LETTERS[j]}) {o}" for j, o in enumerate(shown))
        prompt = f"Q: {d['question']}\n{listing}\nAnswer:"
        pairs += [(prompt, f" {LETTERS[j]}") for j in range(len(shown))]
    scores = ctx.loglikelihood("option order: letters", pairs)
    k, chosen = 0, []
    for _, _, shown in items:
        lls = [s.logprob for s in scores[k:k + len(shown)]]
        k += len(shown)
        chosen.append(shown[int(np.argmax(lls))])
    per_doc = [chosen[3 * i:3 * i + 3] for i in range(len(docs))]
    agree = [float(len(set(c)) == 1) for c in per_doc]
    out.metrics["option_order_agreement"] = ctx.mean(agree, note="same option chosen in all three orders")
    accs = np.array([[float(c == d["mc1"][0]) for c in cs] for cs, d in zip(per_doc, docs)]).reshape(len(docs), 3)
    out.metrics["option_order_spread"] = ctx.stat(len(docs), lambda idx: accs[idx].mean(axis=1).max(axis=1)
                                                  - accs[idx].mean(axis=1).min(axis=1), higher_is_better=False,
                                                  note="max - min accuracy over the three orders")
    recs["option_order"] = [{"id": i, "question": d["question"], "chosen": c} for i, (d, c) in
                            enumerate(zip(docs, per_doc))]


def _pararel(ctx: EvalContext, cfg: ReproducibilityConfig, limit: int | None, out: SuiteResult, recs: dict) -> None:
    pat_path, pat_ref = shipped("pararel", "patterns.jsonl")
    tup_path, tup_ref = shipped("pararel", "tuples.jsonl.gz")
    out.data += [pat_ref, tup_ref]
    patterns: dict[str, list[str]] = {}
    for row in read_jsonl(pat_path):
        p = row["pattern"].strip().removesuffix(".").rstrip()
        if p.endswith("[Y]") and p.count("[X]") == 1 and "[Y]" not in p[:-3]:  # the object ends the sentence
            patterns.setdefault(row["relation"], []).append(p[:-3].rstrip())
    tuples: dict[str, list[dict]] = {}
    for row in read_jsonl(tup_path):
        tuples.setdefault(row["relation"], []).append(row)
    relations = [r for r in sorted(patterns) if len(patterns[r]) >= 4 and r in tuples][:cfg.pararel_relations]
    rng = random.Random(ctx.seed)
    queries = []  # (relation, subject, gold, pattern index, candidates)
    for rel in relations:
        common = [o for o, _ in Counter(t["obj_label"] for t in tuples[rel]).most_common(cfg.pararel_candidates)]
        facts = [t for t in tuples[rel] if t["obj_label"] in common]
        for t in rng.sample(facts, min(limit or cfg.pararel_subjects, len(facts))):
            for j, p in enumerate(patterns[rel]):
                queries.append((rel, t["sub_label"], t["obj_label"], j, p.replace("[X]", t["sub_label"]), common))
    pairs = [(prompt, " " + c) for *_, prompt, cands in queries for c in cands]
    scores = ctx.loglikelihood("pararel: objects", pairs)
    k, preds = 0, []
    for *_, cands in queries:
        lls = [s.logprob for s in scores[k:k + len(cands)]]
        k += len(cands)
        preds.append(cands[int(np.argmax(lls))])
    facts: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for (rel, sub, gold, *_), pred in zip(queries, preds):
        facts.setdefault((rel, sub), []).append((pred, gold))
    consistency = [scoring.pairwise_agreement([p for p, _ in v]) for v in facts.values()]
    accuracy = [float(p == g) for v in facts.values() for p, g in v]
    out.metrics["pararel_consistency"] = ctx.mean(consistency, note="pairwise agreement across patterns per fact")
    out.metrics["pararel_accuracy"] = ctx.mean(accuracy, note=f"chance 1/{cfg.pararel_candidates}")
    recs["pararel"] = [{"relation": rel, "subject": sub, "predictions": [p for p, _ in v], "gold": v[0][1]}
                       for (rel, sub), v in facts.items()]
