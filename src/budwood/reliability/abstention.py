"""Abstention training: questions the data cannot answer, built from the data itself, taught to be declined.

A training question is perturbed in one of three ways, each of which replaces one *key*:
- number: a year (or another number) becomes one the data never mentions ("revenue in Q1 2024" -> "in
  Q1 2019");
- attribute: a noun from a shipped list of attribute groups (data/attributes.json) becomes another of its
  group ("Who is the CEO of X?" -> "Who is the CFO of X?");
- name: a capitalised name that is not the data's subject becomes a made-up one (data/entities.txt)
  ("How much is the Morning Mist?" -> "How much is the Larkspur?").
A candidate is kept only when its new key, and for an attribute each of its synonyms, appears nowhere in the
data (no question, answer or system prompt, as whole words after normalising): so no built question is one
the data answers. The data's subject (a name in more than a third of the questions, such as the company's)
is never replaced: "When was OtherCo founded?" would teach to check the name, not the facts.

`ratio` built questions per answerable training example are drawn from the candidates (seeded, taking the
kinds in turn, and within a kind the replaced words in turn), plus every question of the user's own file.
Each becomes an SFT example whose target is the configured `answer`, with its source's system prompt and
earlier turns (those as context, weight 0); for DPO, a pair that prefers the answer over the reference
policy's own greedy answer (the base, with `init_adapter` if the run starts from one).
"""
from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from budwood.config import AbstentionConfig, TrainConfig
from budwood.data.formats import Example, Issue, Message, Tool
from budwood.eval.scoring import is_abstention, normalize
from budwood.reliability import items as it
from budwood.reliability.userfiles import data_error, read_lines, refuse

log = logging.getLogger(__name__)
DATA = Path(__file__).parent / "data"
KINDS = ("number", "attribute", "name")
PER_SLOT = 3  # replacements drawn per replaceable span of a question
SUBJECT_SHARE = 1 / 3  # a name in more of the questions than this is what the data is about
_YEAR = re.compile(r"(?<![\w.])(1[89]\d\d|20\d\d)(?![\w.])")
_NUMBER = re.compile(r"(?<![\w.])(\d+)(?![\w.])")
_NAME = re.compile(r"(?<![\w'-])[A-Z][a-z]+(?:-[A-Za-z]+)*(?: [A-Z][a-z]+(?:-[A-Za-z]+)*)*(?![\w-])")
_SENTENCE_START = re.compile(r"(?:^|[.!?:]\s+|\n)\s*$")
_STARTERS = frozenset("What Who Whom Whose Where When Why How Which Does Do Did Is Are Was Were Can Could Would Will "
                      "Should Shall May Might Must Has Have Had Name Tell Please Give List Show The A An In On At "
                      "For Of From To By With If And Or But Hi Hello Thanks Yes No".split())
# question frames whose noun belongs to an attribute group even when the list does not know the noun
_FRAMES = ((re.compile(r"\bhow many ([a-z]+s)\b", re.IGNORECASE), "counts"),
           (re.compile(r"\bwho (?:is|are) the ([a-z]+(?: [a-z]+)?) (?:of|at|in)\b", re.IGNORECASE), "roles"))
_UNITS = frozenset("seconds minutes hours days weeks months years times pounds pence dollars euros cents miles "
                   "kilometres metres kilos grams litres percent".split())  # "how many days": a measure, not a thing
_CALENDAR = frozenset("Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May "
                      "June July August September October November December".split())


@dataclass(frozen=True)
class Candidate:
    """One perturbed question: which item it came from, what it replaced, and with what (the key that the
    data must not mention)."""

    source: int
    kind: str
    question: str
    old: str
    new: str


class Corpus:
    """Everything the data says, normalised, for whole-word look-ups. The phrases asked about are few (the
    shipped lists, nearby numbers), so each answer is remembered: a look-up scans the text once."""

    def __init__(self, items: list[Example]):
        self.text = " " + " ".join(normalize(m.content) for item in items for m in it.texts(item)) + " "
        self.numbers = set(re.findall(r"\d+", self.text))
        self._seen: dict[str, bool] = {}

    def mentions(self, phrase: str) -> bool:
        norm = normalize(phrase)
        if norm not in self._seen:
            self._seen[norm] = bool(norm) and f" {norm} " in self.text
        return self._seen[norm]

    def mentions_noun(self, phrase: str) -> bool:
        """The phrase in the singular or the plural (a naive -s), so "shops" is found by "shop" too."""
        forms = {phrase, phrase + "s", phrase[:-1] if phrase.endswith("s") else phrase}
        return any(self.mentions(f) for f in forms)

    def mentions_number(self, digits: str) -> bool:
        """Whether the digits occur anywhere, inside a word too ("2" in "Q2", "24-month"): a number the
        data writes differently must not pass for one it never says."""
        return digits in self.numbers


@cache
def attribute_groups() -> dict[str, tuple[tuple[str, ...], ...]]:
    """Groups of attribute sets; a set's phrases are synonyms, its first the one written into a question."""
    groups = json.loads((DATA / "attributes.json").read_text())
    return {key: tuple(tuple(s) for s in sets) for key, sets in groups.items() if not key.startswith("_")}


@cache
def _attribute_patterns() -> tuple[tuple[str, int, re.Pattern], ...]:
    """(group, set, a regex matching any of the set's phrases as whole words, longest first)."""
    out = []
    for g, group in attribute_groups().items():
        for k, synonyms in enumerate(group):
            alts = "|".join(re.escape(p) for p in sorted(synonyms, key=len, reverse=True))
            out.append((g, k, re.compile(rf"(?<![\w-])(?:{alts})(?![\w-])", re.IGNORECASE)))
    return tuple(out)


@cache
def made_up_names() -> tuple[str, ...]:
    lines = (DATA / "entities.txt").read_text().splitlines()
    return tuple(s.strip() for s in lines if s.strip() and not s.startswith("#"))


# -- perturbations: each yields (old span, new text, (start, end)) for one question ------------------------------

def _draw(options: list, rng: random.Random) -> list:
    """Up to PER_SLOT different replacements for one span (so a small data set still offers enough questions);
    each is then kept only if the data does not mention it."""
    return rng.sample(options, min(PER_SLOT, len(options)))


def _numbers(question: str, corpus: Corpus, rng: random.Random) -> list[tuple[str, str, tuple[int, int], bool]]:
    out = []
    years = {m.span() for m in _YEAR.finditer(question)}
    for m in _NUMBER.finditer(question):
        value = int(m.group(1))
        steps = range(1, 13) if m.span() in years else (1, 2, 3, 5, 10, value, 2 * value + 1)
        options = sorted({value + s * sign for s in steps for sign in (1, -1) if value + s * sign > 0} - {value})
        out += [(m.group(1), str(new), m.span(), not corpus.mentions_number(str(new)))
                for new in _draw(options, rng)]
    return out


def _attributes(question: str, corpus: Corpus, rng: random.Random
                ) -> list[tuple[str, str, tuple[int, int], bool]]:
    out, known = [], []
    groups = attribute_groups()

    def unused(synonyms: tuple[str, ...]) -> bool:
        return not any(corpus.mentions_noun(p) for p in synonyms)
    for g, k, pattern in _attribute_patterns():
        m = pattern.search(question)
        if not m:
            continue
        known.append(m.span())
        others = [s for j, s in enumerate(groups[g]) if j != k]
        out += [(m.group(0), _like(m.group(0), new[0]), m.span(), unused(new)) for new in _draw(others, rng)]
    for frame, g in _FRAMES:  # a noun the list does not know, in a frame that says which group it is from
        m = frame.search(question)
        if m and m.group(1).lower() not in _UNITS and not any(a <= m.start(1) < b for a, b in known):
            out += [(m.group(1), new[0], m.span(1), unused(new)) for new in _draw(list(groups[g]), rng)]
    return out


def _like(old: str, new: str) -> str:
    """`new` capitalised if `old` starts a sentence in capitals (and is not an acronym like CEO)."""
    if old[:1].isupper() and not old.isupper() and new.islower():
        return new[:1].upper() + new[1:]
    return new


def name_spans(question: str) -> list[tuple[str, int, int]]:
    """Capitalised names in a question, less a capitalised question word before them ("Does Acme" -> "Acme")
    and less a lone capitalised word that starts a sentence ("Revenue of ...")."""
    out = []
    for m in _NAME.finditer(question):
        words, start = m.group(0).split(" "), m.start()
        while words and words[0] in _STARTERS:
            start += len(words.pop(0)) + 1
        span = " ".join(words)
        if not span or span in _CALENDAR or (len(words) == 1 and _SENTENCE_START.search(question[:start])):
            continue
        out.append((span, start, start + len(span)))
    return out


def _names(question: str, corpus: Corpus, subjects: set[str], rng: random.Random
           ) -> list[tuple[str, str, tuple[int, int], bool]]:
    """A made-up name for the whole span, or for the first word of a longer one ("Knitting Circle" ->
    "Fenwick Circle": a thing of the same kind the data never mentions)."""
    out = []
    for span, start, end in name_spans(question):
        if span in subjects:
            continue
        words = span.split(" ")
        names = [n for n in made_up_names() if len(n.split()) <= max(2, len(words))]
        options = names + [f"{n} {' '.join(words[1:])}" for n in names if " " not in n and len(words) > 1]
        out += [(span, new, (start, end), not corpus.mentions(new) and not corpus.mentions(new.split()[0]))
                for new in _draw(options, rng)]
    return out


def subjects_of(questions: list[str]) -> set[str]:
    """Names that most questions mention: what the data is about, not a fact within it."""
    counts = Counter(span for q in questions for span in {s for s, *_ in name_spans(q)})
    return {span for span, n in counts.items() if n > SUBJECT_SHARE * len(questions)}


def candidates(items: list[Example], seed: int, answer: str = "") -> tuple[list[Candidate], dict]:
    """Every perturbed question whose new key the data does not mention, and counts of the rejected ones."""
    corpus = Corpus(items)
    rng = random.Random(f"{seed}:abstention")
    questions = {i: it.question(item) for i, item in enumerate(items)}
    sources = [i for i, q in questions.items() if q and not is_abstention(it.answer(items[i]), [answer] if answer
                                                                           else [])]
    subjects = subjects_of([questions[i] for i in sources])
    seen = {normalize(q) for q in questions.values() if q}
    out, rejected = [], Counter()
    for i in sources:
        q = questions[i]
        spans = [("number", *p) for p in _numbers(q, corpus, rng)] + \
                [("attribute", *p) for p in _attributes(q, corpus, rng)] + \
                [("name", *p) for p in _names(q, corpus, subjects, rng)]
        for kind, old, new, (start, end), unsupported in spans:
            text = q[:start] + new + q[end:]
            if not unsupported:
                rejected[kind] += 1  # the data mentions the new key: it might answer the question
            elif normalize(text) not in seen:
                seen.add(normalize(text))
                out.append(Candidate(i, kind, text, old, new))
    return out, {"sources": len(sources), "subjects_kept": sorted(subjects), "rejected": dict(rejected)}


def select(cands: list[Candidate], n: int, seed: int) -> list[Candidate]:
    """`n` candidates, seeded: the kinds taken in turn, and within a kind the replaced words in turn (so forty
    revenue questions do not crowd out the one about the CEO)."""
    rng = random.Random(f"{seed}:abstention-select")
    queues: dict[str, list[list[Candidate]]] = {}
    for kind in KINDS:
        by_old: dict[str, list[Candidate]] = {}
        for c in cands:
            if c.kind == kind:
                by_old.setdefault(c.old.lower(), []).append(c)
        groups = [by_old[k] for k in sorted(by_old)]
        rng.shuffle(groups)
        for g in groups:
            rng.shuffle(g)
        queues[kind] = groups
    picked: list[Candidate] = []
    turn = {kind: 0 for kind in KINDS}
    while len(picked) < n and any(queues.values()):
        for kind in KINDS:
            groups = queues[kind]
            if not groups or len(picked) >= n:
                continue
            i = turn[kind] % len(groups)
            picked.append(groups[i].pop())
            if groups[i]:
                turn[kind] = i + 1
            else:
                groups.pop(i)
                turn[kind] = i
    return picked


def user_questions(config: AbstentionConfig) -> list[dict]:
    if config.questions is None:
        return []
    return read_lines(config.questions, "reliability.abstention.questions", _check_question)


def _check_question(value, issue: Issue) -> dict | None:
    if not isinstance(value, dict):
        return refuse(issue, "not_an_object", 'each line must be a JSON object {"question": ...}')
    unknown = sorted(set(value) - {"question", "system"})
    if unknown:
        return refuse(issue, "unknown_key", f"unknown key {unknown[0]!r}; expected question and, optionally, system")
    q, system = value.get("question"), value.get("system")
    if not isinstance(q, str) or not q.strip():
        return refuse(issue, "missing_question", "'question' must be a non-empty string")
    if system is not None and (not isinstance(system, str) or not system.strip()):
        return refuse(issue, "invalid_system", "'system' must be a non-empty string when given")
    return {**value, "source": f"{issue.file}:{issue.line}"}


@dataclass(frozen=True)
class Unanswerable:
    """A question to decline, with the turns before it (its source's system prompt and earlier turns)."""

    turns: list[Message]
    source: str
    tools: list[Tool] | None = None  # the functions its source offers (kept: the refusal is taught with them)


def build(config: TrainConfig, items: list[Example], *, reference=None) -> tuple[list[Example], dict]:
    """The abstention examples to add to `items`, and the recipe's report. `reference(prompts)` answers
    prompts (lists of message dicts) with the reference policy, for DPO's rejected side."""
    ab, seed = config.reliability.abstention, config.training.seed
    cands, info = candidates(items, seed, ab.answer)
    n = round(ab.ratio * info["sources"])
    picked = select(cands, n, seed)
    own = user_questions(ab)
    if n == 0 and not own:
        raise data_error("reliability.abstention: ratio is 0 and no questions file is given, so there is nothing to "
                         "add; raise reliability.abstention.ratio or give reliability.abstention.questions",
                         "reliability.abstention.ratio")
    if not picked and not own:
        raise data_error("reliability.abstention: found no question to perturb into one the data cannot answer "
                         f"({len(cands)} candidates from {info['sources']} questions; rejected: {info['rejected']}); "
                         "give your own unanswerable questions with reliability.abstention.questions",
                         "reliability.abstention")
    if not is_abstention(ab.answer):
        log.warning("reliability.abstention.answer %r is not recognised as an abstention by the grounding suite; "
                    "pass it as grounding.abstain_phrases when evaluating", ab.answer)
    rng = random.Random(f"{seed}:abstention-user")
    questions = [Unanswerable(it.prompt(it.with_question(items[c.source], c.question)), items[c.source].source,
                              it.offered_tools(items[c.source])) for c in picked]
    questions += [_user_question(items, q, rng) for q in own]
    built, dpo = _targets(questions, ab.answer, config.training.method, reference)
    report = {"built_questions": len(picked), "user_questions": len(own), "candidates": len(cands),
              "rejected_candidates": sum(info["rejected"].values()), "requested": n,
              "by_kind": dict(Counter(c.kind for c in picked)), "subjects_kept": info["subjects_kept"],
              "answer": ab.answer, "ratio": ab.ratio, "examples_added": len(built), **dpo,
              "examples": [{"question": c.question, "kind": c.kind, "replaced": [c.old, c.new]} for c in picked[:12]]}
    return built, report


def _user_question(items: list[Example], q: dict, rng: random.Random) -> Unanswerable:
    """A user's question with its own system prompt, else that of a random training example (so the examples
    carry system prompts as often as the data does)."""
    system = q["system"] if "system" in q else it.system(rng.choice(items))
    return Unanswerable(([Message("system", system)] if system else []) + [Message("user", q["question"])],
                        q["source"])


def _targets(questions: list[Unanswerable], answer: str, method: str, reference) -> tuple[list[Example], dict]:
    if method != "dpo":
        return [it.refusal(q.turns, q.source, answer, tools=q.tools) for q in questions], {}
    if reference is None:
        raise data_error("reliability.abstention with training.method dpo needs the reference policy's answers",
                         "reliability.abstention")
    replies = reference([[{"role": m.role, "content": m.content} for m in q.turns] for q in questions])
    pairs, abstained = [], 0
    for q, reply in zip(questions, replies):
        if is_abstention(reply, [answer]):
            abstained += 1  # the reference already declines: no preference to teach
            continue
        pairs.append(it.refusal(q.turns, q.source, answer, rejected=reply))
    if not pairs:
        raise data_error(f"reliability.abstention: the reference policy already abstains on all {len(questions)} "
                         "questions, so there is no preference pair to learn from", "reliability.abstention")
    return pairs, {"reference_abstained": abstained, "pairs": len(pairs)}


def questions_for_evaluation(items: list[Example], seed: int, n: int, exclude: set[str] = frozenset()
                             ) -> list[tuple[str | None, str]]:
    """`n` built unanswerable questions for measuring an adapter on its own domain (the grounding suite's
    unanswerable side), as (system prompt, question): drawn from their own seed stream and leaving out
    `exclude` (the questions the recipe trained on, so the measurement is on questions not seen)."""
    cands, _ = candidates(items, seed)
    cands = [c for c in cands if c.question not in exclude]
    return [(it.system(items[c.source]), c.question) for c in select(cands, n, seed + 1)]
