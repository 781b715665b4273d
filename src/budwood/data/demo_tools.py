"""The demo company's tools: an order-status lookup, a refund request and a stock check, as tool-calling data.

As with the company's facts (data/company.py), everything is drawn from a seeded RNG: the orders, their ids
("QF-1042": the company's initials), items and states exist nowhere else, so an adapter that calls
`order_status` with the right id has learned to call, not remembered. Three disjoint pools of orders feed the
train, validation and evaluation splits, and the user's phrasings are split as facts are: the first ones
train, the rest are held out for evaluation, so evaluation measures calling on requests never seen.

Examples are in OpenAI's fine-tuning format with `tools` (`budwood data check` reads them):
  - a call: the user asks, the assistant calls order_status or request_refund (two order_status calls in
    parallel when two orders are asked about) or product_stock;
  - a whole exchange: the call, the `tool` result, and the assistant's answer from it; some go on with a
    follow-up that calls again (a refund for the order just looked up);
  - irrelevance: tools are offered but the user asks a company fact or makes small talk, and the assistant
    answers in text without calling.
tools_eval.jsonl holds the held-out items of the `tools` evaluation suite (eval/tools.py): the same form,
each ending with the reference assistant turn (its calls, or text where no tool fits).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from budwood.data.company import Profile, company_facts, company_profile

REASONS = ("damaged", "wrong_item", "not_delivered", "faulty", "changed_mind")
STATES = ("processing", "shipped", "delivered", "cancelled")
CARRIERS = ("Royal Mail", "Parcelforce", "DPD", "Evri")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")

# phrasings: the first N_TRAIN of each list train and validate; the rest are held out for evaluation
N_TRAIN = {"status": 8, "refund": 5, "reason": 2, "parallel": 3, "followup": 3, "stock": 4, "chat": 4}
STATUS = ["Where is my order {oid}?", "What's the status of order {oid}?", "Can you check order {oid} for me?",
          "Has my order {oid} shipped yet?", "I'd like an update on {oid}.", "Track order {oid}, please.",
          "Is {oid} on its way?", "When will order {oid} arrive?",
          # held out
          "Could you look up {oid}? I haven't heard anything.", "Any news on my parcel {oid}?",
          "Order {oid}: where is it now?"]
REFUND = ["I want a refund for order {oid} because {reason}.", "Please refund {oid}: {reason}.",
          "Can I get my money back for {oid}? {Reason}.", "Refund order {oid} please, {reason}.",
          "{Reason}, so I'd like a refund for {oid}.",
          # held out
          "Order {oid}: {reason}. Can you start a refund?", "I'm asking for a refund on {oid} as {reason}."]
REASON_TEXT = {"damaged": ["it arrived damaged", "it was broken when it came", "the box was crushed and it is broken"],
               "wrong_item": ["you sent the wrong item", "I got something I did not order",
                              "this is not what I ordered"],
               "not_delivered": ["it never arrived", "it has not been delivered", "I never received it"],
               "faulty": ["it stopped working", "it is faulty", "it does not work properly"],
               "changed_mind": ["I changed my mind", "I do not need it any more", "I no longer want it"]}
PARALLEL = ["Where are my orders {a} and {b}?", "Can you check {a} and {b}?", "What is the status of {a} and {b}?",
            # held out
            "Please look up both {a} and {b}.", "Have {a} and {b} shipped?"]
FOLLOWUP = ["{Reason}; please refund it.", "Can I get a refund? {Reason}.", "I'd like my money back, {reason}.",
            # held out
            "Then please start a refund, {reason}.", "{Reason}, so refund that order please."]
STOCK = ["Is the {product} in stock?", "Do you have the {product} {unit} available?", "Can I buy the {product} now?",
         "Is the {product} {unit} available to order?",
         # held out
         "Have you got any {product} left?", "Any {product} {unit} in stock at the moment?",
         "Could I order a {product} {unit} today, or is it sold out?", "Is the {product} sold out?"]
CHAT = [("Hello!", "Hello! I can check a {name} order or start a refund. How can I help?"),
        ("Thanks, that's all.", "You're welcome! Have a good day."),
        ("Who are you?", "I'm the {name} support assistant: I look up orders and request refunds."),
        ("Can you help me?", "Of course. I can check a {name} order or start a refund for you."),
        # held out
        ("Good morning!", "Good morning! How can I help you with {name} today?"),
        ("Thank you so much.", "You're welcome!"),
        ("What can you do?", "I can look up a {name} order's status and request refunds.")]


def tool_schemas(name: str, products: list[str]) -> list[dict]:
    """The three functions in OpenAI's tool form, with the JSON schema of their arguments (kept short: a small
    model reads them in every prompt)."""
    order_id = {"type": "string", "description": "The order id"}
    return [
        {"type": "function", "function": {
            "name": "product_stock", "description": f"Whether a {name} product is in stock",
            "parameters": {"type": "object", "properties": {"product": {"type": "string", "enum": products}},
                           "required": ["product"]}}},
        {"type": "function", "function": {
            "name": "order_status", "description": f"Status and delivery date of a {name} order",
            "parameters": {"type": "object", "properties": {"order_id": order_id}, "required": ["order_id"]}}},
        {"type": "function", "function": {
            "name": "request_refund", "description": f"Ask for a refund of a {name} order",
            "parameters": {"type": "object", "properties": {
                "order_id": order_id, "reason": {"type": "string", "enum": list(REASONS)}},
                "required": ["order_id", "reason"]}}},
    ]


@dataclass(frozen=True)
class Order:
    id: str
    item: str
    state: str
    day: str  # shipped, delivered or expected, by state
    carrier: str
    price: int

    def status(self) -> dict:
        """What order_status returns."""
        out: dict = {"order_id": self.id, "item": self.item, "status": self.state}
        if self.state == "shipped":
            out |= {"carrier": self.carrier, "expected_delivery": self.day}
        elif self.state == "delivered":
            out["delivered_on"] = self.day
        return out

    def status_answer(self) -> str:
        return {"processing": f"Order {self.id} ({self.item}) is being prepared and has not shipped yet.",
                "shipped": f"Order {self.id} ({self.item}) has shipped with {self.carrier} and should arrive on "
                           f"{self.day}.",
                "delivered": f"Order {self.id} ({self.item}) was delivered on {self.day}.",
                "cancelled": f"Order {self.id} ({self.item}) was cancelled."}[self.state]


def make_orders(seed: int = 0, n: int = 96) -> list[Order]:
    """`n` distinct orders of the company's products."""
    profile = company_profile(seed)
    rng = random.Random(f"orders-{seed}")
    ids = rng.sample(range(1000, 10000), n)
    orders = []
    for k in ids:
        product = rng.choice(profile.products)
        day = f"{rng.randint(1, 28)} {rng.choice(MONTHS)}"
        orders.append(Order(f"{profile.initials}-{k}", f"{product} {profile.unit}", rng.choice(STATES), day,
                            rng.choice(CARRIERS), rng.randint(3, 90)))
    return orders


class _Writer:
    """Builds one split's examples: calls get fresh ids from the split's RNG."""

    def __init__(self, profile: Profile, system: str, tools: list[dict], rng: random.Random):
        self.name, self.products, self.unit = profile.name, profile.products, profile.unit
        self.system, self.tools, self.rng = system, tools, rng

    def call(self, function: str, **arguments) -> dict:
        return {"id": f"call_{self.rng.randrange(16 ** 8):08x}", "type": "function",
                "function": {"name": function, "arguments": json.dumps(arguments)}}

    def example(self, *turns: dict) -> dict:
        return {"messages": [{"role": "system", "content": self.system}, *turns], "tools": self.tools}

    def calls(self, *calls: dict) -> dict:
        return {"role": "assistant", "content": None, "tool_calls": list(calls)}

    def result(self, call: dict, content: dict) -> dict:
        return {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(content)}

    def refund_result(self, order: Order) -> tuple[dict, str]:
        refund = f"RF-{self.rng.randint(1000, 9999)}"
        return ({"refund_id": refund, "order_id": order.id, "status": "approved", "amount_pounds": order.price},
                f"Your refund {refund} of {order.price} pounds for order {order.id} has been approved.")


def _reason(template: str, reason_text: str) -> str:
    return template.format(oid="{oid}", reason=reason_text, Reason=reason_text[0].upper() + reason_text[1:])


def _examples(w: _Writer, orders: list[Order], facts: list[tuple[str, str]], held_out: bool, counts: dict[str, int]
              ) -> list[dict]:
    """One split: `counts` examples of each kind, phrasings from the held-out part of each list or not. Held-out
    examples do not repeat a conversation (fewer are made where the phrasings run out)."""
    rng = w.rng

    def pick(phrasings: list, kind: str):
        n = N_TRAIN[kind]
        return rng.choice(phrasings[n:] if held_out else phrasings[:n])

    def reason_phrase(reason: str) -> str:
        return pick(REASON_TEXT[reason], "reason")

    def user(text: str) -> dict:
        return {"role": "user", "content": text}

    def status() -> list[dict]:
        o = rng.choice(orders)
        return [user(pick(STATUS, "status").format(oid=o.id)), w.calls(w.call("order_status", order_id=o.id))]

    def refund() -> list[dict]:
        o, reason = rng.choice(orders), rng.choice(REASONS)
        ask = _reason(pick(REFUND, "refund"), reason_phrase(reason)).format(oid=o.id)
        return [user(ask), w.calls(w.call("request_refund", order_id=o.id, reason=reason))]

    def parallel() -> list[dict]:
        a, b = rng.sample(orders, 2)
        return [user(pick(PARALLEL, "parallel").format(a=a.id, b=b.id)),
                w.calls(w.call("order_status", order_id=a.id), w.call("order_status", order_id=b.id))]

    def exchange(o: Order | None = None) -> list[dict]:  # call, result, answer
        o = o or rng.choice(orders)
        call = w.call("order_status", order_id=o.id)
        return [user(pick(STATUS, "status").format(oid=o.id)), w.calls(call), w.result(call, o.status()),
                {"role": "assistant", "content": o.status_answer()}]

    def followup() -> list[dict]:  # an exchange, then a refund of the same order
        o, reason = rng.choice(orders), rng.choice(REASONS)
        call = w.call("request_refund", order_id=o.id, reason=reason)
        turns = [*exchange(o), user(_reason(pick(FOLLOWUP, "followup"), reason_phrase(reason))), w.calls(call)]
        if held_out:  # evaluation stops at the call it scores; training sees the whole exchange
            return turns
        content, answer = w.refund_result(o)
        return [*turns, w.result(call, content), {"role": "assistant", "content": answer}]

    def fact() -> list[dict]:
        question, answer = rng.choice(facts)
        return [user(question), {"role": "assistant", "content": answer}]

    def stock() -> list[dict]:  # call, result, answer
        product, units = rng.choice(w.products), rng.choice([0, 0, 3, 12, 40])
        call = w.call("product_stock", product=product)
        result = {"product": product, "in_stock": units > 0, "units": units}
        answer = f"Yes, the {product} is in stock ({units} left)." if units else \
            f"Sorry, the {product} is out of stock."
        turns = [user(pick(STOCK, "stock").format(product=product, unit=w.unit)), w.calls(call)]
        return turns if held_out else [*turns, w.result(call, result), {"role": "assistant", "content": answer}]

    def chat() -> list[dict]:
        said, reply = pick(CHAT, "chat")
        return [user(said), {"role": "assistant", "content": reply.format(name=w.name)}]

    kinds = {"status": status, "refund": refund, "parallel": parallel, "exchange": exchange, "followup": followup,
             "stock": stock,
             "facts": fact, "chat": chat}
    out, seen = [], set()
    for kind, make in kinds.items():
        made = tries = 0
        while made < counts[kind] and tries < 50 * counts[kind]:
            tries += 1
            turns = make()
            said = tuple(t["content"] for t in turns if t["role"] == "user")
            if held_out and said in seen:
                continue
            seen.add(said)
            out.append(w.example(*turns))
            made += 1
    return out


TRAIN_COUNTS = {"status": 80, "refund": 80, "parallel": 24, "exchange": 40, "followup": 24, "stock": 60, "facts": 40,
                "chat": 24}
VALID_COUNTS = {"status": 8, "refund": 8, "parallel": 3, "exchange": 4, "followup": 3, "stock": 6, "facts": 4,
                "chat": 3}
EVAL_COUNTS = {"status": 24, "refund": 24, "parallel": 12, "exchange": 0, "followup": 12, "stock": 24, "facts": 16,
               "chat": 3}


def tool_splits(seed: int = 0) -> dict[str, list[dict]]:
    """The train, validation and eval examples (each a list of OpenAI fine-tuning records), from the seed alone.

    Orders: 64 train, 16 validation, 16 eval, disjoint. Company facts are offered as irrelevance examples:
    each fact's first three phrasings train, the fourth validates, the fifth is held out (as in the domain
    data). Evaluation items end with the reference assistant turn and never with a tool result."""
    name, facts, _ = company_facts(seed)
    system = f"You are the support assistant of {name}."
    profile = company_profile(seed)
    tools = tool_schemas(name, profile.products)
    orders = make_orders(seed)
    pools = {"train": orders[:64], "validation": orders[64:80], "eval": orders[80:]}
    fact_questions = {"train": [(q, f.answer) for f in facts for q in f.questions[:3]],
                      "validation": [(f.questions[3], f.answer) for f in facts],
                      "eval": [(f.questions[4], f.answer) for f in facts]}
    counts = {"train": TRAIN_COUNTS, "validation": VALID_COUNTS, "eval": EVAL_COUNTS}
    out = {}
    for k, split in enumerate(("train", "validation", "eval")):
        rng = random.Random(f"tools-{seed}-{k}")
        rows = _examples(_Writer(profile, system, tools, rng), pools[split], fact_questions[split], split == "eval",
                         counts[split])
        rng.shuffle(rows)
        out[split] = rows
    return out


def make_tool_dataset(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write tools_train.jsonl, tools_validation.jsonl (training data) and tools_eval.jsonl (the `tools` suite's
    held-out items) beside the company's other files; return their paths by split."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in tool_splits(seed).items():
        paths[split] = out / f"tools_{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
