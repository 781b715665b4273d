"""A fictional company's facts as question-answer data: the demo's domain, and evaluation's domain suite.

Every fact is drawn from a seeded RNG, so no pretrained model can know it: an adapter that answers
held-out questions right has learned them from the training data. Each fact is asked in several
phrasings; some phrasings are kept out of training (held-out questions test whether the adapter
learned the fact rather than the sentence). Unanswerable questions ask about things the data never
states, so a reliable model should abstain on them.
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ABSTAIN = "I don't know; that is not in my information about {name}."

_PREFIXES = ["Quill", "Amber", "Marrow", "Hollin", "Brisk", "Tansy", "Corvid", "Pellet", "Juniper", "Wren"]
_SUFFIXES = ["feather", "gate", "wick", "stone", "field", "brook", "worth", "mere"]
_TRADES = [("tea", ["Morning Mist", "Smoky Ember", "Gold Leaf", "River Mint", "Night Owl"], "tin"),
           ("bicycle", ["Sparrow", "Kestrel", "Heron", "Swift", "Osprey"], "bicycle"),
           ("lamp", ["Glowworm", "Lantern Nine", "Dusk", "Beacon", "Candlefly"], "lamp")]
_CITIES = ["Harrowgate", "Port Elsin", "Marlow Cross", "Duncastle", "Westerholt", "Fairmead", "Oxley Bay"]
_FIRST = ["Ada", "Bram", "Celia", "Dorian", "Edith", "Felix", "Greta", "Hugo", "Iris", "Jonah"]
_LAST = ["Pennyworth", "Ashdown", "Calloway", "Thistle", "Merriweather", "Hartley", "Quince"]


@dataclass
class Fact:
    id: str
    answer: str
    questions: list[str]  # the first `n_train` phrasings train; the rest are held out
    key: str = ""  # the fact's value alone ("1987", "Harrowgate"): an answer naming it is right


@dataclass(frozen=True)
class Profile:
    """Who the company is: the first draws of its seed, shared by its facts and its tools (data/demo_tools.py)."""
    name: str
    initials: str  # Quill + feather: QF (its order ids' prefix)
    trade: str
    products: list[str]
    unit: str


def _profile(rng: random.Random) -> Profile:
    prefix, suffix = rng.choice(_PREFIXES), rng.choice(_SUFFIXES)
    trade, products, unit = rng.choice(_TRADES)
    return Profile(prefix + suffix, (prefix[0] + suffix[0]).upper(), trade, list(products), unit)


def company_profile(seed: int = 0) -> Profile:
    return _profile(random.Random(seed))


def company_facts(seed: int = 0) -> tuple[str, list[Fact], list[str]]:
    """(company name, facts, unanswerable questions), all determined by the seed."""
    rng = random.Random(seed)
    profile = _profile(rng)
    name, trade, products, unit = profile.name, profile.trade, profile.products, profile.unit
    city = rng.choice(_CITIES)
    ceo = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    founded = rng.randint(1952, 2011)
    staff = rng.randint(40, 900)
    ret = rng.choice([14, 21, 30, 45, 60])
    ship = rng.choice([25, 40, 50, 75])
    warranty = rng.choice([6, 12, 18, 24, 36])
    hours = rng.choice(["8am to 6pm", "9am to 5pm", "7am to 7pm", "10am to 4pm"])
    facts = [
        Fact("founded", f"{name} was founded in {founded}.",
             [f"When was {name} founded?", f"What year was {name} founded?", f"In which year did {name} start?",
              f"How long ago was {name} founded, what year?", f"Founding year of {name}?"], key=str(founded)),
        Fact("headquarters", f"{name} has its headquarters in {city}.",
             [f"Where is {name} based?", f"Where are the headquarters of {name}?", f"Which city is {name} in?",
              f"In what city does {name} have its main office?", f"Where is {name}'s head office?"], key=city),
        Fact("ceo", f"The chief executive of {name} is {ceo}.",
             [f"Who is the CEO of {name}?", f"Who runs {name}?", f"Who is the chief executive of {name}?",
              f"Who leads {name}?", f"Name the head of {name}."], key=ceo),
        Fact("staff", f"{name} employs {staff} people.",
             [f"How many people work at {name}?", f"How many employees does {name} have?",
              f"What is the headcount of {name}?", f"How big is the staff of {name}?",
              f"How many staff does {name} employ?"], key=str(staff)),
        Fact("returns", f"{name} accepts returns within {ret} days of delivery.",
             [f"What is the return policy of {name}?", f"How many days do I have to return an item to {name}?",
              f"Can I return something to {name}, and until when?", f"What is {name}'s return window?",
              f"How long is the return period at {name}?"], key=f"{ret} days"),
        Fact("shipping", f"{name} ships for free on orders over {ship} pounds.",
             [f"When is shipping free at {name}?", f"Does {name} offer free shipping?",
              f"What is the free shipping threshold at {name}?",
              f"How much must I spend for free delivery from {name}?",
              f"Is delivery free at {name}?"], key=f"{ship} pounds"),
        Fact("warranty", f"Every {unit} from {name} has a {warranty}-month warranty.",
             [f"What warranty does {name} give?", f"How long is the warranty at {name}?",
              f"Is there a guarantee on {name} products?", f"How many months of warranty does {name} offer?",
              f"What is {name}'s warranty period?"], key=f"{warranty}-month"),
        Fact("support", f"{name} customer support is open from {hours}, Monday to Friday.",
             [f"When is {name} support open?", f"What are the support hours of {name}?",
              f"When can I call {name} customer service?", f"What hours does {name} support work?",
              f"Is {name} support open now, what are its hours?"], key=hours),
        Fact("trade", f"{name} makes and sells {trade}s.",
             [f"What does {name} sell?", f"What kind of company is {name}?", f"What products does {name} make?",
              f"What is {name}'s business?", f"What does {name} do?"], key=f"{trade}s"),
    ]
    for product in products:
        price = rng.randint(3, 90) * (10 if trade == "bicycle" else 1)
        facts.append(Fact(f"price-{product.lower().replace(' ', '-')}",
                          f"The {product} from {name} costs {price} pounds.",
                          [f"How much is the {product}?", f"What does the {product} from {name} cost?",
                           f"What is the price of the {product}?", f"How much does {name} charge for the {product}?",
                           f"{product} price?"], key=f"{price} pounds"))
    revenue = {}
    for year in (2024, 2025):
        for q in (1, 2, 3, 4):
            revenue[(year, q)] = round(rng.uniform(1.2, 9.8), 1)
            facts.append(Fact(f"revenue-{year}-q{q}", f"{name} had revenue of {revenue[(year, q)]} million pounds "
                              f"in Q{q} {year}.",
                              [f"What was {name}'s revenue in Q{q} {year}?",
                               f"How much did {name} earn in Q{q} {year}?",
                               f"Revenue of {name} for the quarter Q{q} {year}?",
                               f"What were the Q{q} {year} sales of {name}?",
                               f"How much revenue did {name} make in quarter {q} of {year}?"],
                              key=f"{revenue[(year, q)]} million"))
    unanswerable = [f"What is the stock ticker of {name}?", f"Who was the first customer of {name}?",
                    f"How many patents does {name} hold?", f"What is {name}'s profit margin?",
                    f"What was {name}'s revenue in Q1 2019?", f"Who designs the logo of {name}?",
                    f"How many shops does {name} have in France?", f"What is the phone number of {name}?",
                    f"What was {name}'s revenue in Q3 2031?", f"Who is the chief financial officer of {name}?"]
    return name, facts, unanswerable


def make_domain_dataset(out_dir: str | Path, seed: int = 0, n_train_phrasings: int = 3,
                        abstention_examples: bool = True, tools: bool = False) -> dict[str, Path]:
    """Write train.jsonl, validation.jsonl (OpenAI chat format) and heldout.jsonl; return their paths. With
    `tools`, also the company's tool-calling data (data/demo_tools.py): tools_train.jsonl, tools_validation.jsonl
    and tools_eval.jsonl, returned as tools_train, tools_validation and tools_eval.

    heldout.jsonl lines: {"question", "answer" (null if unanswerable), "answers" (the fact's value), "fact",
    "answerable", "system"}: the grounding suite's format.
    Training includes a few abstentions on other unanswerable questions, so abstaining is a learned
    behaviour and the held-out unanswerable questions measure it; `abstention_examples=False` leaves them
    out, for measuring what the abstention recipe (budwood.reliability) builds from the facts alone.
    """
    name, facts, unanswerable = company_facts(seed)
    system = f"You answer questions about {name} using only its facts."
    extra_unknowns = [f"What is the favourite colour of the founder of {name}?",
                      f"How tall is the head office of {name}?", f"What car does the CEO of {name} drive?",
                      f"What was {name}'s revenue in Q2 2017?", f"Who is the lawyer of {name}?",
                      f"What is the email address of {name}?", f"How many lorries does {name} own?",
                      f"Which bank does {name} use?", f"What was {name}'s revenue in Q4 2030?",
                      f"Does {name} sell anything in Japan?", f"What is the salary of the CEO of {name}?",
                      f"Who founded {name}?"]
    abstentions = [(q, ABSTAIN.format(name=name)) for q in extra_unknowns] if abstention_examples else []
    paths = write_splits(out_dir, facts, unanswerable, system, random.Random(seed + 1), n_train_phrasings,
                         abstentions)
    (Path(out_dir) / "company.json").write_text(json.dumps({"name": name, "seed": seed, "system": system}) + "\n")
    if tools:
        from budwood.data.demo_tools import make_tool_dataset

        paths |= {f"tools_{split}": path for split, path in make_tool_dataset(out_dir, seed).items()}
    return paths


def write_splits(out_dir: str | Path, facts: list[Fact], unanswerable: list[str], system: str, rng: random.Random,
                 n_train_phrasings: int = 3, abstentions: Sequence[tuple[str, str]] = ()) -> dict[str, Path]:
    """The three files of a question-answer domain: each fact's first `n_train_phrasings` phrasings train, the
    next one validates, the rest (with the unanswerable questions) are held out; `abstentions` are
    (question, answer) examples added to training. Half the chat examples carry the system prompt."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def chat(question: str, answer: str) -> dict:
        msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return {"messages": ([{"role": "system", "content": system}] if rng.random() < 0.5 else []) + msgs}

    train, validation, heldout = [], [], []
    for fact in facts:
        for q in fact.questions[:n_train_phrasings]:
            train.append(chat(q, fact.answer))
        validation.append(chat(fact.questions[n_train_phrasings], fact.answer))
        for q in fact.questions[n_train_phrasings:]:
            heldout.append({"question": q, "answer": fact.answer, "answers": [fact.key], "fact": fact.id,
                            "answerable": True, "system": system})
    for q, answer in abstentions:
        train.append(chat(q, answer))
    for q in unanswerable:
        heldout.append({"question": q, "answer": None, "fact": None, "answerable": False, "system": system})
    rng.shuffle(train)
    paths = {}
    for split, rows in (("train", train), ("validation", validation), ("heldout", heldout)):
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
