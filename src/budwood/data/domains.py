"""More fictional domains in the demo company's style (data/company.py): a library's help desk and a health
centre's front desk, for measuring on domains a recipe was not tuned on.

As with the company, every fact comes from a seeded RNG (no pretrained model can know it), each fact is asked
in five phrasings of which the first `n_train_phrasings` train, the next validates and the rest are held out,
and held-out unanswerable questions ask for what the data never states.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from budwood.data.company import Fact, write_splits
from budwood.errors import BudwoodError, did_you_mean

ABSTAIN = "I'm sorry, I don't know; that is not in my information about {name}."

_TOWNS = ["Ashbury", "Brindle", "Coldwater", "Dunholm", "Eastmere", "Foxton", "Glenrock", "Hawkridge", "Kettleby",
          "Larchmont"]
_FIRST = ["Agnes", "Basil", "Cora", "Desmond", "Elsie", "Fergus", "Hattie", "Ivor", "Maud", "Rupert"]
_LAST = ["Bramble", "Cobbold", "Dimmock", "Fairweather", "Gosling", "Hollis", "Larkin", "Pottinger"]
_HOURS = ["9am to 7pm", "8am to 8pm", "10am to 6pm", "9am to 5pm"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


def _fact(id: str, answer: str, key: str, *questions: str) -> Fact:
    return Fact(id, answer, list(questions), key=key)


def library_facts(seed: int = 0) -> tuple[str, list[Fact], list[str], list[str]]:
    """(library name, facts, held-out unanswerable questions, other unanswerable questions for training)."""
    rng = random.Random(seed)
    n = f"{rng.choice(_TOWNS)} Library"
    facts = _library_basics(n, rng)
    for section in ("Local History", "Science", "Children's", "Music", "Travel"):
        floor = rng.randint(0, 4)
        facts.append(_fact(f"floor-{section.lower().replace(' ', '-')}", f"The {section} section of {n} is on "
                           f"floor {floor}.", f"floor {floor}", f"Which floor is the {section} section on?",
                           f"Where is the {section} section of {n}?", f"On what floor are the {section} books?",
                           f"Where do I find {section} books at {n}?", f"{section} section floor?"))
    for club in ("Book Club", "Chess Club", "Knitting Circle", "Coding Club"):
        day, time = rng.choice(_DAYS), rng.choice(["10am", "2pm", "4pm", "6pm"])
        facts.append(_fact(f"club-{club.lower().replace(' ', '-')}", f"The {club} at {n} meets on {day}s at {time}.",
                           f"{day}s", f"When does the {club} meet?", f"What day is the {club} at {n}?",
                           f"When is the {club} held at {n}?", f"Which day does the {n} {club} meet?",
                           f"{club} at {n}, when?"))
    for year in (2021, 2022, 2023, 2024):
        visitors = rng.randint(20, 95) * 1000
        facts.append(_fact(f"visitors-{year}", f"{n} had {visitors} visitors in {year}.", str(visitors),
                           f"How many visitors did {n} have in {year}?", f"How many people visited {n} in {year}?",
                           f"What was the number of visitors to {n} in {year}?",
                           f"How busy was {n} in {year}, in visitors?", f"Visitors to {n} in {year}?"))
    unanswerable = [f"How many books does {n} hold?", f"What is the email address of {n}?",
                    f"Who designed the building of {n}?", f"How many visitors did {n} have in 2016?",
                    f"When does the Poetry Circle at {n} meet?", f"Who is the deputy librarian of {n}?",
                    f"How many computers does {n} have for the public?",
                    f"Which floor is the Cookery section of {n} on?",
                    f"How much does {n} spend on new books each year?", f"Is there a cafe in {n}?"]
    others = [f"What is the phone number of {n}?", f"Who founded {n}?", f"How many staff work at {n}?",
              f"How many visitors did {n} have in 2019?", f"When does the Film Club at {n} meet?",
              f"Which floor is the Art section of {n} on?", f"What is the budget of {n}?",
              f"Does {n} lend musical instruments?", f"Who cleans {n}?", f"Is there parking at {n}?",
              f"What is the postcode of {n}?", f"How many DVDs does {n} have?"]
    return n, facts, unanswerable, others


def _library_basics(n: str, rng: random.Random) -> list[Fact]:
    """The library's one-off facts: hours, people, rules and fees."""
    head = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    hours, sat = rng.choice(_HOURS), rng.choice(["10am to 1pm", "9am to 4pm", "10am to 5pm"])
    loan, items, fee = rng.choice([14, 21, 28]), rng.choice([6, 8, 10, 12, 15]), rng.choice([10, 15, 20, 25, 30])
    renew, member, opened = rng.choice([2, 3, 5]), rng.choice([8, 12, 15, 20]), rng.randint(1890, 1990)
    printing, study, card = rng.choice([5, 10, 15, 20]), rng.choice([2, 3, 4]), rng.choice([2, 3, 5])
    wifi = rng.choice(["BookNook", "ReadFreely", "PageTurner", "QuietZone"])
    return [
        _fact("hours", f"{n} is open from {hours} on weekdays.", hours, f"When is {n} open?",
              f"What are the opening hours of {n}?", f"What time does {n} open on weekdays?",
              f"When can I visit {n} during the week?", f"What are {n}'s weekday hours?"),
        _fact("saturday", f"On Saturdays {n} is open from {sat}; it is closed on Sundays.", sat,
              f"Is {n} open at the weekend?", f"What are the Saturday hours of {n}?",
              f"When does {n} open on Saturday?", f"Can I visit {n} on a Saturday, and when?",
              f"What are {n}'s weekend opening times?"),
        _fact("head", f"The head librarian of {n} is {head}.", head, f"Who is the head librarian of {n}?",
              f"Who runs {n}?", f"Who is in charge of {n}?", f"Who leads {n}?", f"Name the head librarian at {n}."),
        _fact("loan", f"Books from {n} can be borrowed for {loan} days.", f"{loan} days",
              f"How long can I borrow a book from {n}?", f"What is the loan period at {n}?",
              f"For how many days can I keep a book from {n}?", f"How long are loans at {n}?",
              f"When do I have to bring back a book to {n}?"),
        _fact("items", f"Members of {n} can borrow up to {items} items at once.", f"{items} items",
              f"How many books can I borrow from {n}?", f"What is the borrowing limit at {n}?",
              f"How many items can a member of {n} take out?", f"Is there a limit on loans at {n}?",
              f"How many books at once can I have from {n}?"),
        _fact("fine", f"The late fee at {n} is {fee} pence per day for each item.", f"{fee} pence",
              f"What is the late fee at {n}?", f"How much is the fine for a late book at {n}?",
              f"What does {n} charge when I return a book late?", f"Are there overdue fines at {n}?",
              f"How much do I pay at {n} if a book is overdue?"),
        _fact("renew", f"A loan from {n} can be renewed {renew} times.", f"{renew} times",
              f"How often can I renew a loan at {n}?", f"Can I renew my books at {n}?",
              f"How many renewals does {n} allow?", f"Can I extend a loan from {n}, how many times?",
              f"What is the renewal limit at {n}?"),
        _fact("membership", f"Membership of {n} is free for residents; others pay {member} pounds a year.",
              f"{member} pounds", f"How much does it cost to join {n}?", f"Is membership of {n} free?",
              f"What is the membership fee at {n}?", f"Do I have to pay to be a member of {n}?",
              f"How much is a year's membership of {n} for non-residents?"),
        _fact("opened", f"{n} opened in {opened}.", str(opened), f"When did {n} open?",
              f"What year was {n} opened?", f"How old is {n}, when did it open?", f"When was {n} established?",
              f"In which year did {n} first open its doors?"),
        _fact("printing", f"Printing at {n} costs {printing} pence per page.", f"{printing} pence",
              f"How much is printing at {n}?", f"What does a printed page cost at {n}?",
              f"Can I print at {n}, and what does it cost?", f"What is the price of printing at {n}?",
              f"How much do I pay per page to print at {n}?"),
        _fact("study", f"Study rooms at {n} can be booked for up to {study} hours.", f"{study} hours",
              f"How long can I book a study room at {n}?", f"Can I reserve a study room at {n}?",
              f"What is the limit for study room bookings at {n}?", f"For how long are study rooms lent at {n}?",
              f"How many hours can I have a study room at {n}?"),
        _fact("card", f"Replacing a lost library card at {n} costs {card} pounds.", f"{card} pounds",
              f"What if I lose my card at {n}?", f"How much is a new library card at {n}?",
              f"What does {n} charge to replace a lost card?", f"I lost my {n} card, what does a new one cost?",
              f"Is there a fee for a replacement card at {n}?"),
        _fact("wifi", f"{n} has free wifi; the network is called {wifi}.", wifi, f"Does {n} have wifi?",
              f"What is the wifi network at {n}?", f"Can I get online at {n}?",
              f"Which wifi network do I join at {n}?", f"Is there internet access at {n}?"),
    ]


def clinic_facts(seed: int = 0) -> tuple[str, list[Fact], list[str], list[str]]:
    """(health centre name, facts, held-out unanswerable questions, other unanswerable questions)."""
    rng = random.Random(seed)
    n = f"{rng.choice(_TOWNS)} Health Centre"
    facts = _clinic_basics(n, rng)
    for clinic in ("Diabetes", "Asthma", "Baby", "Travel"):
        doctor = f"Dr {rng.choice(_LAST)}"
        facts.append(_fact(f"clinic-{clinic.lower()}", f"The {clinic} clinic at {n} is run by {doctor}.", doctor,
                           f"Who runs the {clinic} clinic?", f"Which doctor leads the {clinic} clinic at {n}?",
                           f"Who is in charge of the {clinic} clinic at {n}?",
                           f"Who do I see at the {clinic} clinic of {n}?", f"{clinic} clinic doctor at {n}?"))
    for vaccine in ("Yellow Fever", "Typhoid", "Rabies", "Cholera", "Hepatitis A"):
        price = rng.randint(15, 90)
        facts.append(_fact(f"vaccine-{vaccine.lower().replace(' ', '-')}", f"The {vaccine} vaccine costs {price} "
                           f"pounds at {n}.", f"{price} pounds", f"How much is the {vaccine} vaccine?",
                           f"What does the {vaccine} jab cost at {n}?", f"What is the price of a {vaccine} vaccine?",
                           f"How much does {n} charge for the {vaccine} vaccine?", f"{vaccine} vaccine price?"))
    for year in (2022, 2023, 2024):
        seen = rng.randint(18, 60) * 1000
        facts.append(_fact(f"appointments-{year}", f"{n} gave {seen} appointments in {year}.", str(seen),
                           f"How many appointments did {n} give in {year}?",
                           f"How many appointments were there at {n} in {year}?",
                           f"What was the number of appointments at {n} in {year}?",
                           f"How busy was {n} in {year}, in appointments?", f"Appointments at {n} in {year}?"))
    unanswerable = [f"Who is the practice manager of {n}?", f"What is the email address of {n}?",
                    f"How many appointments did {n} give in 2015?", "How much is the Dengue vaccine?",
                    f"Who runs the Dermatology clinic at {n}?", f"Does {n} have its own pharmacy?",
                    f"How many parking spaces does {n} have?", f"How long is the wait for physiotherapy at {n}?",
                    f"Which hospital does {n} send patients to?", f"How many doctors work at {n}?"]
    others = [f"Who founded {n}?", f"What is the postcode of {n}?", "How much is the Measles vaccine?",
              f"How many appointments did {n} give in 2019?", f"Who runs the Heart clinic at {n}?",
              f"Is {n} open on Sundays?", f"What is the budget of {n}?", f"Does {n} offer dentistry?",
              f"Who cleans {n}?", f"How many receptionists work at {n}?", f"What is the website of {n}?",
              f"Does {n} have a lift?"]
    return n, facts, unanswerable, others


def _clinic_basics(n: str, rng: random.Random) -> list[Fact]:
    """The health centre's one-off facts: hours, people and rules."""
    lead = f"Dr {rng.choice(_FIRST)} {rng.choice(_LAST)}"
    hours, length, notice = rng.choice(_HOURS), rng.choice([10, 12, 15]), rng.choice([12, 24, 48])
    repeat, blood, line = rng.choice([2, 3, 5]), rng.choice(_DAYS), rng.choice(["7am", "8am", "8.30am"])
    patients, opened, nurses = rng.randint(40, 160) * 100, rng.randint(1950, 2015), rng.randint(3, 14)
    return [
        _fact("hours", f"{n} is open from {hours}, Monday to Friday.", hours, f"When is {n} open?",
              f"What are the opening hours of {n}?", f"What time does {n} open?",
              f"When can I come to {n}?", f"What are {n}'s hours?"),
        _fact("lead", f"The lead doctor at {n} is {lead}.", lead, f"Who is the lead doctor at {n}?",
              f"Who runs {n}?", f"Who is the senior doctor of {n}?", f"Who leads {n}?",
              f"Name the lead doctor at {n}."),
        _fact("length", f"An appointment at {n} lasts {length} minutes.", f"{length} minutes",
              f"How long is an appointment at {n}?", f"How many minutes do I get with a doctor at {n}?",
              f"What is the appointment length at {n}?", f"How long will my appointment at {n} be?",
              f"Appointment duration at {n}?"),
        _fact("cancel", f"Appointments at {n} must be cancelled {notice} hours ahead.", f"{notice} hours",
              f"How do I cancel an appointment at {n}?", f"How much notice does {n} need to cancel?",
              f"When must I cancel an appointment at {n}?", f"What is the cancellation rule at {n}?",
              f"How early do I have to cancel at {n}?"),
        _fact("repeat", f"Repeat prescriptions at {n} are ready within {repeat} working days.", f"{repeat} working",
              f"How long does a repeat prescription take at {n}?", f"When is my repeat prescription ready at {n}?",
              f"How fast does {n} process repeat prescriptions?",
              f"How many days for a repeat prescription at {n}?", f"Repeat prescription wait at {n}?"),
        _fact("blood", f"Blood tests at {n} are taken on {blood} mornings.", blood,
              f"When are blood tests done at {n}?", f"What day can I have a blood test at {n}?",
              f"When does {n} take blood samples?", f"Which morning are blood tests at {n}?",
              f"Blood test day at {n}?"),
        _fact("phone", f"The {n} phone line opens at {line}.", line, f"When does the {n} phone line open?",
              f"What time can I phone {n}?", f"When do the phones open at {n}?",
              f"From what time can I call {n}?", f"What time does {n} answer calls?"),
        _fact("patients", f"{n} has {patients} registered patients.", str(patients),
              f"How many patients does {n} have?", f"How many people are registered at {n}?",
              f"What is the list size of {n}?", f"How big is {n}, in patients?",
              f"How many registered patients are at {n}?"),
        _fact("opened", f"{n} opened in {opened}.", str(opened), f"When did {n} open?",
              f"What year was {n} opened?", f"How old is {n}, when did it open?", f"When was {n} established?",
              f"Since what year has {n} been open?"),
        _fact("nurses", f"{n} employs {nurses} nurses.", f"{nurses} nurses", f"How many nurses work at {n}?",
              f"How many nurses does {n} have?", f"What is the number of nurses at {n}?",
              f"How big is the nursing team at {n}?", f"Nurses at {n}, how many?"),
    ]


DOMAINS = {"library": library_facts, "clinic": clinic_facts}


def make_dataset(domain: str, out_dir: str | Path, seed: int = 0, n_train_phrasings: int = 3,
                 abstention_examples: bool = False) -> dict[str, Path]:
    """Write one domain's train.jsonl, validation.jsonl and heldout.jsonl, as company.make_domain_dataset does.

    Unlike the demo company, no abstention examples are trained on unless asked: these domains measure what
    the abstention recipe builds from the facts alone."""
    if domain not in DOMAINS:
        raise BudwoodError(f"unknown domain {domain!r}{did_you_mean(domain, DOMAINS)}; choose from "
                           f"{', '.join(DOMAINS)}")
    name, facts, unanswerable, others = DOMAINS[domain](seed)
    system = f"You answer questions about {name} using only its facts."
    abstentions = [(q, ABSTAIN.format(name=name)) for q in others] if abstention_examples else []
    paths = write_splits(out_dir, facts, unanswerable, system, random.Random(seed + 1), n_train_phrasings,
                         abstentions)
    (Path(out_dir) / "domain.json").write_text(json.dumps({"domain": domain, "name": name, "seed": seed,
                                                           "system": system}) + "\n")
    return paths
