"""Format augmentation: each training question also in other surface forms, the answer unchanged, so that
casing, punctuation, spacing and a wrapper around the question stop changing the answer (FormatSpread,
Sclar et al. 2024, measures how much they do; eval/reproducibility.py's format part reports it).

Four kinds of rewriting, each a few seeded transforms of the question text (the last user turn):
- case: Title Case, a lower-case first letter, some words in capitals, the first words shouted;
- punctuation: no final mark, a doubled or different one, no apostrophes or commas, a trailing ellipsis;
- spacing: one or two doubled spaces, a tab, a leading or trailing newline;
- template: a wrapper such as "Q: ...\\nA:", "Please tell me: ...", "... Please answer briefly.".
The evaluation's own renderings (reproducibility.variants: all lower case, all upper case, every space
doubled, "Question: ...\\nAnswer:", the system prompt inside the user turn) are never produced, so the suite
measures phrasings the adapter was not trained on.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable

from budwood.config import FormatAugmentationConfig
from budwood.data.formats import Example
from budwood.errors import DataError
from budwood.eval.data import Question
from budwood.eval.reproducibility import variants as suite_variants
from budwood.reliability import items as it

Transform = Callable[[str, random.Random], str]
TRIES = 12  # draws per variant before giving up on finding a new surface form


def _words(text: str, fn: Callable[[str, int], str]) -> str:
    """`fn(word, position)` applied to each word (positions count the spaces between too), spacing kept."""
    parts = re.split(r"(\s+)", text)
    return "".join(fn(p, i) if i % 2 == 0 else p for i, p in enumerate(parts))


def _title(text: str, rng: random.Random) -> str:
    return _words(text, lambda w, _: w[:1].upper() + w[1:])


def _lower_first(text: str, rng: random.Random) -> str:
    return text[:1].lower() + text[1:]


def _some_upper(text: str, rng: random.Random) -> str:
    return _words(text, lambda w, _: w.upper() if rng.random() < 0.35 else w.lower())


def _shout_start(text: str, rng: random.Random) -> str:
    k = rng.randint(1, 3) * 2
    return _words(text, lambda w, i: w.upper() if i < k else w)


def _end_mark(text: str) -> tuple[str, str]:
    body = text.rstrip()
    stripped = body.rstrip("?.!")
    return stripped, body[len(stripped):]


def _no_mark(text: str, rng: random.Random) -> str:
    return _end_mark(text)[0]


def _other_mark(text: str, rng: random.Random) -> str:
    body, mark = _end_mark(text)
    return body + rng.choice([m for m in ("??", "?!", ".", "!", " ?") if m != mark])


def _no_apostrophes(text: str, rng: random.Random) -> str:
    return text.replace("'", "").replace("\u2019", "")


def _no_commas(text: str, rng: random.Random) -> str:
    return text.replace(",", "")


def _ellipsis(text: str, rng: random.Random) -> str:
    return _end_mark(text)[0] + rng.choice(["...", "?..."])


def _double_some(text: str, rng: random.Random) -> str:
    gaps = [m.start() for m in re.finditer(" ", text)]
    chosen = set(rng.sample(gaps, min(len(gaps), rng.randint(1, 2))))
    return "".join(ch + (" " if i in chosen else "") for i, ch in enumerate(text))


def _tab(text: str, rng: random.Random) -> str:
    gaps = [m.start() for m in re.finditer(" ", text)]
    if not gaps:
        return text
    i = rng.choice(gaps)
    return text[:i] + "\t" + text[i + 1:]


def _edge_newline(text: str, rng: random.Random) -> str:
    return rng.choice(["\n" + text, text + "\n", "\n" + text + "\n", text + "\n\n"])


TEMPLATES = ("Q: {q}\nA:", "Please tell me: {q}", "I have a question. {q}", "{q} Please answer briefly.",
             "Quick question: {q}", "Can you help me? {q}", "Query - {q}", "Hi! {q} Thanks.", "{q}\n\nThank you.",
             "I'd like to know: {q}", "Help needed. {q}", "{q} (asking for a friend)")


def _template(text: str, rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(q=text)


FORMS: dict[str, tuple[Transform, ...]] = {
    "case": (_title, _lower_first, _some_upper, _shout_start),
    "punctuation": (_no_mark, _other_mark, _no_apostrophes, _no_commas, _ellipsis),
    "spacing": (_double_some, _tab, _edge_newline),
    "template": (_template,),
}


def suite_forms(text: str, system: str | None) -> set[str]:
    """The reproducibility suite's own renderings of a question: never trained on."""
    renderings = suite_variants(Question(text, None, system), [])
    return {turns[-1]["content"] for turns in renderings.values()}


def rewrite(text: str, system: str | None, forms: list[str], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """Up to `n` distinct (form, text) rewritings of a question, none equal to it or to a suite rendering."""
    banned = suite_forms(text, system)
    out: list[tuple[str, str]] = []
    for _ in range(n):
        for _ in range(TRIES):
            form = rng.choice(forms)
            new = rng.choice(FORMS[form])(text, rng)
            if new.strip() and new not in banned:
                banned.add(new)
                out.append((form, new))
                break
    return out


def augment(items: list[Example], config: FormatAugmentationConfig, seed: int) -> tuple[list[Example], dict]:
    """The items followed by `variants` rewritten copies of each one that has a question; deterministic."""
    rng = random.Random(f"{seed}:format_augmentation")
    copies: list[Example] = []
    by_form: Counter = Counter()
    without = short = 0
    for item in items:
        text = it.question(item)
        if text is None:
            without += 1
            continue
        found = rewrite(text, it.system(item), list(config.forms), config.variants, rng)
        short += found != [] and len(found) < config.variants
        for form, new in found:
            copies.append(it.with_question(item, new))
            by_form[form] += 1
    if not copies:
        raise DataError("reliability.format_augmentation: no training example has a user question to rewrite "
                        f"(forms: {', '.join(config.forms)})")
    return items + copies, {"variants": config.variants, "forms": list(config.forms), "examples_added": len(copies),
                            "by_form": dict(by_form), "without_question": without, "fewer_variants": short}
