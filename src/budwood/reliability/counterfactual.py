"""Counterfactual data augmentation (Lu et al. 2020; Zmigrod et al. 2019): an example whose prompt says who
is asking ("I am a woman", "my husband", "Priya") gets a copy in which those words are swapped ("I am a man",
"my wife", "Raj"), with the same answer, so the data no longer ties an answer to who asks. The bias suite's
counterfactual part (eval/bias.py) measures the share of answers that change when only that changes.

Swap lists are JSONL lines of two or more terms: a pair swaps both ways, a longer group swaps each member
for another one drawn from the seeded RNG. Terms match as whole words (hyphens count as word characters,
so "non-binary" is not "binary"), longest first ("a man" before "man"); lower-case terms match in any case
and the replacement takes the case of the word it replaces ("He" -> "She", "HE" -> "SHE"); capitalised
terms (names, "Muslim") match only capitalised or upper case. A word of several entries ("her" is both
"him"'s and "his"'s) is read from the word after it: a possessive before a noun ("her bag" -> "his bag"),
an object pronoun otherwise ("ask her" -> "ask him").

Facts are kept: a term the data states as a fact is *protected* and never swapped, since swapping it would
teach a falsehood. That is a name (or another capitalised term, such as a product's origin) that an answer
says and its prompt does not, and any term in an answer to a prompt that mentions nobody ("Who is the CEO?"
-> "He is James Bell"). Other terms in answers follow the prompt's swap ("I am a man ..." -> "Sir, ...").
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from budwood.config import CounterfactualConfig
from budwood.data.formats import Example, Issue
from budwood.errors import DataError
from budwood.hashing import sha256_file
from budwood.reliability import items as it
from budwood.reliability.userfiles import read_lines, refuse

DATA = Path(__file__).parent / "data"
SHIPPED = ("demographic_terms.jsonl", "first_names.jsonl")
PARAM = "reliability.counterfactual.word_pairs"
# words after which "her"/"his" is a pronoun, not a possessive ("ask her to", "gave her a")
_NOT_A_NOUN = frozenset("a an the to and or but for with at in on of about from by as than so if that this is was "
                        "are were be been will would can could should may might must do does did has have had "
                        "not no yes please when where who why how what which up down out off over".split())
_POSSESSIVES = ("his", "her")


@dataclass
class SwapList:
    """term (lower case) -> the entries it is in, each as the other members of that entry."""

    options: dict[str, list[list[str]]] = field(default_factory=dict)
    capitalised: dict[str, str] = field(default_factory=dict)  # lower -> spelling: matches only so or in UPPER
    pattern: re.Pattern = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.compile()

    def add(self, entry: list[str]) -> None:
        for term in entry:
            self.options.setdefault(term.lower(), []).append([t for t in entry if t != term])
            if term[:1].isupper():
                self.capitalised[term.lower()] = term

    def compile(self) -> None:
        """One regex over every term, longest first, so "a man" wins over "man"."""
        alts = []
        for term in sorted(self.options, key=len, reverse=True):
            spelled = self.capitalised.get(term)
            alts.append(f"(?:{re.escape(spelled)}|{re.escape(spelled.upper())})" if spelled
                        else f"(?i:{re.escape(term)})")
        self.pattern = re.compile(rf"(?<![\w-])(?:{'|'.join(alts) or '(?!x)x'})(?![\w-])")

    def found(self, text: str) -> list[str]:
        """The swappable terms in `text`, lower case, in order."""
        return [m.group(0).lower() for m in self.pattern.finditer(text)]


def load_swaps(config: CounterfactualConfig) -> tuple[SwapList, dict]:
    """The user's list (config word_pairs) or the shipped ones, and where it came from (the report)."""
    swaps = SwapList()
    if config.word_pairs is not None:
        for entry in read_lines(config.word_pairs, PARAM, _check_entry):
            swaps.add(entry)
        source = {"word_pairs": str(config.word_pairs), "sha256": sha256_file(Path(config.word_pairs))}
    else:
        for name in SHIPPED:
            for entry in read_lines(DATA / name, PARAM, _check_entry):
                swaps.add(entry)
        source = {"word_pairs": "shipped: " + ", ".join(SHIPPED)}
    swaps.compile()
    return swaps, source


def _check_entry(value, issue: Issue) -> list[str] | None:
    if not isinstance(value, list) or len(value) < 2:
        return refuse(issue, "invalid_entry", "each line must be a JSON list of two or more terms, e.g. "
                                              '["husband", "wife"]')
    if not all(isinstance(t, str) and t.strip() == t and t for t in value):
        return refuse(issue, "invalid_term", "terms must be non-empty strings without leading or trailing spaces")
    if len({t.lower() for t in value}) != len(value):
        return refuse(issue, "duplicate_term", f"{value}: a term appears twice in one entry")
    return value


def protected_terms(items: list[Example], swaps: SwapList) -> set[str]:
    """Terms the data states as facts: a name an answer says that its prompt does not, or any term an answer
    says when its prompt mentions nobody ("Who is the CEO?" -> "He is James Bell")."""
    out: set[str] = set()
    for item in items:
        asked = {t for m in it.prompt(item) if m.role != "assistant" for t in swaps.found(m.content)}
        for m in it.texts(item):
            if m.role == "assistant":
                out |= {t for t in swaps.found(m.content) if t not in asked and (t in swaps.capitalised or not asked)}
    return out


def swap_text(text: str, swaps: SwapList, protected: set[str], chosen: dict[str, str], rng: random.Random) -> str:
    """`text` with every unprotected term swapped; `chosen` keeps a group's draw the same within one copy."""
    def repl(m: re.Match) -> str:
        word = m.group(0)
        key = word.lower()
        if key in protected:
            return word
        entries = swaps.options[key]
        entry = entries[0] if len(entries) == 1 else _by_context(entries, text[m.end():])
        if len(entry) == 1:
            new = entry[0]
        else:
            new = chosen.setdefault(key, rng.choice(entry))
        return _match_case(word, new)
    return swaps.pattern.sub(repl, text)


def _by_context(entries: list[list[str]], rest: str) -> list[str]:
    """For a word of several entries ("her": him or his): the possessive reading before a noun."""
    nxt = re.match(r"\s*([A-Za-z]+)", rest)
    noun_follows = bool(nxt) and nxt.group(1).lower() not in _NOT_A_NOUN
    for entry in entries:
        if any(t.lower() in _POSSESSIVES for t in entry) == noun_follows:
            return entry
    return entries[0]


def _match_case(old: str, new: str) -> str:
    if old.isupper() and len(old) > 1:
        return new.upper()
    if old[:1].isupper() and not new[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def augment(items: list[Example], config: CounterfactualConfig, seed: int) -> tuple[list[Example], dict]:
    """The items followed by one counterfactual copy of a `share` of those whose prompt names a swappable,
    unprotected term; deterministic in `seed`."""
    swaps, source = load_swaps(config)
    protected = protected_terms(items, swaps)
    eligible = [i for i, item in enumerate(items)
                if any(t not in protected for m in it.prompt(item) if m.role != "assistant"
                       for t in swaps.found(m.content))]
    if not eligible:
        raise DataError(f"reliability.counterfactual: no training example's prompt mentions a term of the swap "
                        f"list ({source['word_pairs']}) that the data does not state as a fact; nothing to "
                        "swap. Give your own list with reliability.counterfactual.word_pairs, or turn the recipe "
                        "off")
    rng = random.Random(f"{seed}:counterfactual")
    picked = sorted(rng.sample(eligible, max(1, round(len(eligible) * config.share))))
    copies, swapped = [], Counter()
    for i in picked:
        chosen: dict[str, str] = {}
        copy = it.map_turns(items[i], lambda m, _, c=chosen: swap_text(m.content, swaps, protected, c, rng))
        swapped.update(t for m in it.prompt(items[i]) for t in swaps.found(m.content) if t not in protected)
        copies.append(copy)
    report = {**source, "eligible_examples": len(eligible), "copies": len(copies), "share": config.share,
              "protected_terms": sorted(protected), "terms_swapped": dict(swapped.most_common(20))}
    return items + copies, report
