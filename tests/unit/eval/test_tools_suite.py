"""The tools suite: BFCL's AST rules (each able to fail), exact match, schema validity, irrelevance, the item files
it reads and refuses, both targets' tool answers, and the demo company's tool data it scores by default."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from budwood.data.company import company_facts
from budwood.data.demo_tools import make_tool_dataset, tool_splits
from budwood.data.formats import read_dataset
from budwood.errors import DataError
from budwood.eval import tools
from budwood.eval.context import EvalContext
from budwood.eval.run import EvalConfig
from budwood.eval.targets import EmittedCall, OpenAITarget, ToolPrompt, ToolReply
from budwood.eval.tools import ExpectedCall, ToolItem, ast_error, call_error, exact_match, valid_calls

SCHEMA = {"type": "object", "properties": {
    "order_id": {"type": "string"}, "reason": {"type": "string", "enum": ["damaged", "faulty"]},
    "amount": {"type": "number"}, "count": {"type": "integer"}, "note": {"type": "string"}},
    "required": ["order_id"]}
SCHEMAS = {"refund": SCHEMA, "status": {"type": "object", "properties": {"order_id": {"type": "string"}},
                                        "required": ["order_id"]}}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": s}} for n, s in SCHEMAS.items()]


def call(name: str, **args) -> EmittedCall:
    return EmittedCall(name, json.dumps(args))


def ref(name: str, accepted: dict | None = None, **args) -> ExpectedCall:
    return ExpectedCall(name, args, accepted or {})


# --- BFCL's AST rules ------------------------------------------------------------------------------------------

def test_a_matching_call_passes_and_strings_are_compared_as_bfcl_does():
    assert call_error(call("refund", order_id="QF-1042", reason="damaged"),
                      ref("refund", order_id="qf 1042", reason="Damaged"), SCHEMA) is None
    assert tools.normalise("QF-1042, please!") == tools.normalise("qf1042please")


@pytest.mark.parametrize("emitted, expected, error", [
    (call("status", order_id="QF-1"), ref("refund", order_id="QF-1"), "the reference calls 'refund'"),
    (call("refund", reason="damaged"), ref("refund", reason="damaged"), "required parameter 'order_id' missing"),
    (call("refund", order_id="QF-1", colour="red"), ref("refund", order_id="QF-1"), "'colour' is not in the "
                                                                                     "function's schema"),
    (call("refund", order_id="QF-1", note="x"), ref("refund", order_id="QF-1"), "'note' is not in the reference"),
    (call("refund", order_id="QF-2"), ref("refund", order_id="QF-1"), "'order_id' is \"QF-2\""),
    (call("refund", order_id="QF-1"), ref("refund", order_id="QF-1", reason="faulty"), "'reason' missing"),
    (call("refund", order_id="QF-1", count=2.0), ref("refund", order_id="QF-1", count=2), "the schema says"),
    (call("refund", order_id="QF-1", amount=True), ref("refund", order_id="QF-1", amount=1), "the schema says"),
    (EmittedCall("refund", "[1, 2]"), ref("refund", order_id="QF-1"), "not a JSON object"),
])
def test_each_ast_rule_fails_a_call_that_breaks_it(emitted, expected, error):
    assert error in call_error(emitted, expected, SCHEMA)


def test_an_int_is_accepted_for_a_number_and_numbers_compare_by_value():
    assert call_error(call("refund", order_id="QF-1", amount=5), ref("refund", order_id="QF-1", amount=5.0),
                      SCHEMA) is None
    assert call_error(call("refund", order_id="QF-1", amount=5.5), ref("refund", order_id="QF-1", amount=5),
                      SCHEMA) is not None


def test_accepted_values_are_bfcl_possible_answers_and_empty_string_allows_leaving_out():
    expected = ref("refund", {"reason": ["faulty"], "note": ["", "gift"]}, order_id="QF-1", reason="damaged")
    for ok in (call("refund", order_id="QF-1", reason="damaged"), call("refund", order_id="QF-1", reason="faulty"),
               call("refund", order_id="QF-1", reason="faulty", note="Gift")):
        assert call_error(ok, expected, SCHEMA) is None
    assert "'note' is" in call_error(call("refund", order_id="QF-1", reason="faulty", note="other"), expected, SCHEMA)
    assert "'reason' missing" in call_error(call("refund", order_id="QF-1"), expected, SCHEMA)


def test_parallel_calls_match_in_any_order_but_not_in_other_numbers():
    expected = [ref("status", order_id="QF-1"), ref("status", order_id="QF-2")]
    assert ast_error([call("status", order_id="QF-2"), call("status", order_id="QF-1")], expected, SCHEMAS) is None
    assert "made 1 call(s), the reference 2" in ast_error([call("status", order_id="QF-1")], expected, SCHEMAS)
    assert "matches no reference call left" in ast_error(
        [call("status", order_id="QF-1"), call("status", order_id="QF-1")], expected, SCHEMAS)


def test_parallel_matching_finds_the_assignment_a_greedy_pass_misses():
    """The first call fits both references, the second only the first reference: a one-to-one matching exists."""
    expected = [ref("refund", {"reason": ["faulty"]}, order_id="QF-1", reason="damaged"),
                ref("refund", order_id="QF-1", reason="damaged")]
    calls = [call("refund", order_id="QF-1", reason="damaged"), call("refund", order_id="QF-1", reason="faulty")]
    assert ast_error(calls, expected, SCHEMAS) is None


def test_exact_match_needs_equal_json_in_any_order():
    expected = [ref("status", order_id="QF-1"), ref("refund", order_id="QF-2", amount=3)]
    assert exact_match([call("refund", amount=3.0, order_id="QF-2"), call("status", order_id="QF-1")], expected)
    assert not exact_match([call("status", order_id="qf-1"), call("refund", order_id="QF-2", amount=3)], expected)
    assert not exact_match([call("status", order_id="QF-1")], expected)
    assert not exact_match([EmittedCall("status", "{oops"), call("refund", order_id="QF-2", amount=3)], expected)


def test_valid_json_checks_parsing_the_function_and_the_schema():
    assert valid_calls([call("refund", order_id="QF-1", reason="faulty")], SCHEMAS)
    assert not valid_calls([EmittedCall("refund", '{"order_id": "QF-1"')], SCHEMAS)
    assert not valid_calls([call("cancel", order_id="QF-1")], SCHEMAS)
    assert not valid_calls([call("refund", order_id="QF-1", reason="bored")], SCHEMAS)  # not in the enum
    assert not valid_calls([call("refund", reason="faulty")], SCHEMAS)  # required order_id


def item(expected: list[ExpectedCall], category: str = "simple") -> ToolItem:
    return ToolItem("t", ToolPrompt([{"role": "user", "content": "hi"}], TOOLS), expected, category)


def test_judge_scores_irrelevance_and_a_malformed_attempt():
    none = item([], "irrelevance")
    assert not tools.judge(ToolReply("Hello!", []), none).called
    assert tools.judge(ToolReply(None, [call("status", order_id="QF-1")]), none).called
    broken = tools.judge(ToolReply('<tool_call>{"name": ', [], malformed=True), item([ref("status", order_id="Q")]))
    assert broken.called and not broken.ast and not broken.exact and broken.valid is False


# --- the suite on a stand-in target ---------------------------------------------------------------------------

class Canned:
    """A target that answers each prompt with the reply its last user turn names."""

    def __init__(self, replies: dict[str, ToolReply]):
        self.replies, self.seen = replies, []

    def generate_tools(self, prompts, gen):
        self.seen += prompts
        return [self.replies[p.messages[-1]["content"]] for p in prompts]


def write_items(tmp_path, rows, name="items.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def row(question: str, *calls: tuple[str, dict], answer: str | None = None, **extra) -> dict:
    last = {"role": "assistant", "content": answer} if answer else {"role": "assistant", "content": None,
                                                                     "tool_calls": [
        {"id": f"c{k}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
        for k, (n, a) in enumerate(calls)]}
    return {"messages": [{"role": "user", "content": question}, last], "tools": TOOLS, **extra}


def test_the_suite_reports_every_metric_with_an_interval_and_records(tmp_path):
    path = write_items(tmp_path, [
        row("one", ("status", {"order_id": "QF-1"})),
        row("two", ("status", {"order_id": "QF-1"}), ("status", {"order_id": "QF-2"})),
        row("three", ("refund", {"order_id": "QF-3", "reason": "damaged"}), accepted=[{"reason": ["faulty"]}]),
        row("hello", answer="Hello!"), row("thanks", answer="You're welcome.")])
    target = Canned({"one": ToolReply(None, [call("status", order_id="qf-1")]),  # AST yes, exact no
                     "two": ToolReply(None, [call("status", order_id="QF-2"), call("status", order_id="QF-1")]),
                     "three": ToolReply(None, [call("refund", order_id="QF-3", reason="bored")]),
                     "hello": ToolReply("Hi!", []), "thanks": ToolReply(None, [call("status", order_id="QF-9")])})
    res = tools.run(EvalContext(target, bootstrap=200), tools.ToolsConfig(data=path), None, records=True)
    m = {k: v.value for k, v in res.metrics.items()}
    assert m["ast_match"] == pytest.approx(2 / 3) and m["exact_match"] == pytest.approx(1 / 3)
    assert m["function_match"] == 1.0 and m["irrelevance"] == 0.5 and m["call_rate"] == 0.8
    assert m["valid_json"] == pytest.approx(3 / 4)  # 'bored' is not in the enum
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["ast_match_parallel"] == 1.0 and m["ast_match_simple"] == 0.5
    assert all(v.ci is not None for v in res.metrics.values() if v.n > 1)
    assert res.records[2]["ast_error"].startswith("refund: parameter 'reason' is \"bored\"")
    assert res.data[0].sha256 and res.name == "tools" and target.seen[0].tools == TOOLS
    short = tools.run(EvalContext(target, bootstrap=0), tools.ToolsConfig(data=path), 2, records=False)
    assert short.metrics["call_rate"].n == 2 and short.records is None


def test_prompts_keep_tool_calls_and_results_and_get_ids_where_the_data_has_none(tmp_path):
    """TRL's form: arguments as objects, no ids, results answering calls in order."""
    trl = {"messages": [
        {"role": "user", "content": "Status of QF-1?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "status",
                                                                              "arguments": {"order_id": "QF-1"}}}]},
        {"role": "tool", "name": "status", "content": "shipped"},
        {"role": "assistant", "content": "It has shipped.", "weight": 1},
        {"role": "user", "content": "Refund it, it is damaged."},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "refund", "arguments": {"order_id": "QF-1", "reason": "damaged"}}}]}], "tools": TOOLS}
    (it,), _, _ = tools.read_items(write_items(tmp_path, [trl]))
    msgs = it.prompt.messages
    assert it.category == "multi_turn" and it.expected == [ref("refund", order_id="QF-1", reason="damaged")]
    assert msgs[1]["tool_calls"][0]["id"] == msgs[2]["tool_call_id"] and msgs[1]["content"] is None
    assert json.loads(msgs[1]["tool_calls"][0]["function"]["arguments"]) == {"order_id": "QF-1"}
    assert all("weight" not in m and "name" not in m for m in msgs)


def test_bad_item_files_are_refused_by_name_and_line(tmp_path, monkeypatch):
    good = row("one", ("status", {"order_id": "QF-1"}))
    bad = row("two", ("status", {"order": "QF-1"}))  # breaks the schema: reported as training data would be
    with pytest.raises(DataError, match=r"items.jsonl:2: arguments_schema"):
        tools.read_items(write_items(tmp_path, [good, bad]))
    with pytest.raises(DataError, match=r"items.jsonl:1: invalid_json"):
        tools.read_items(write_items(tmp_path, ["{not json", good]))
    with pytest.raises(DataError, match=r"'accepted' must be a list with one object per reference call"):
        tools.read_items(write_items(tmp_path, [{**good, "accepted": [{}, {}]}]))
    with pytest.raises(DataError, match=r"declares no parameter 'colour'"):
        tools.read_items(write_items(tmp_path, [{**good, "accepted": [{"colour": ["red"]}]}]))
    plain = {"messages": good["messages"][:1] + [{"role": "assistant", "content": "hi"}]}
    with pytest.raises(DataError, match=r"no example offers tools"):
        tools.read_items(write_items(tmp_path, [plain]))
    items, _, left_out = tools.read_items(write_items(tmp_path, [plain, good, plain]))
    assert len(items) == 1 and left_out == 2
    with pytest.raises(DataError, match=r"demo:0: no 'tools'"):
        tools.item_from_record(plain, "demo:0")
    with pytest.raises(DataError, match=r"preference pairs"):
        tools.read_items(write_items(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    monkeypatch.setattr(tools, "MAX_ITEMS", 1)
    with pytest.raises(DataError, match=r"2 records, over the tools suite's limit of 1 \(tools.data\)"):
        tools.read_items(write_items(tmp_path, [good, good]))
    monkeypatch.setattr(tools, "MAX_FILE_BYTES", 10)
    with pytest.raises(DataError, match=r"bytes, over the tools suite's limit of 10 \(tools.data\)"):
        tools.read_items(write_items(tmp_path, [good]))


def test_the_suite_is_registered_with_its_config():
    cfg = EvalConfig(target="budwood-tiny", suites=["tools"], tools={"data": "x.jsonl", "max_tokens": 64})
    assert cfg.tools.max_tokens == 64
    with pytest.raises(ValueError, match="extra"):
        EvalConfig(target="budwood-tiny", tools={"dta": "x"})


def test_an_openai_target_sends_tools_and_reads_message_tool_calls():
    sent = []

    def create(**kw):
        sent.append(kw)
        fn = SimpleNamespace(name="status", arguments='{"order_id": "QF-1"}')
        message = SimpleNamespace(content=None, tool_calls=[SimpleNamespace(type="function", function=fn)])
        return SimpleNamespace(choices=[SimpleNamespace(message=message)], system_fingerprint="fp")

    target = OpenAITarget.__new__(OpenAITarget)
    target.client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))
    target.model, target.concurrency = "m", 1
    target.info = SimpleNamespace(endpoint="http://x/v1", system_fingerprint=None)
    (reply,) = target.generate_tools([ToolPrompt([{"role": "user", "content": "hi"}], TOOLS, False)],
                                     tools.Gen(max_tokens=8))
    assert reply.calls == [call("status", order_id="QF-1")] and not reply.malformed
    assert sent[0]["tools"] == TOOLS and sent[0]["tool_choice"] == "auto" and sent[0]["parallel_tool_calls"] is False


# --- the demo company's tool data -----------------------------------------------------------------------------

def test_demo_tool_data_is_determined_by_the_seed():
    assert tool_splits(0) == tool_splits(0)
    assert tool_splits(0)["eval"] != tool_splits(1)["eval"]


def test_demo_tool_files_pass_data_validation(tmp_path):
    paths = make_tool_dataset(tmp_path, seed=0)
    for split, path in paths.items():
        ds = read_dataset(path, min_examples=1)
        assert ds.errors == [] and ds.format == "openai" and all(c.tools for c in ds.conversations), split
    items, _, left_out = tools.read_items(paths["eval"])
    assert left_out == 0
    assert {i.category for i in items} == {"simple", "parallel", "multi_turn", "irrelevance"}
    assert [i.expected for i in items] == [i.expected for i in tools.demo_items()[0]]


def test_the_company_data_set_writes_its_tool_files_when_asked(tmp_path):
    from budwood.data.company import make_domain_dataset

    plain = make_domain_dataset(tmp_path / "plain", seed=0)
    both = make_domain_dataset(tmp_path / "both", seed=0, tools=True)
    assert set(plain) == {"train", "validation", "heldout"} and not list((tmp_path / "plain").glob("tools_*"))
    assert set(both) - set(plain) == {"tools_train", "tools_validation", "tools_eval"}
    assert all(both[k].read_bytes() == plain[k].read_bytes() for k in plain)


def test_held_out_requests_and_orders_are_never_trained_on():
    """Not only new order ids: every held-out request is worded as no training request is."""
    splits = tool_splits(0)

    def wordings(rows):
        return {re.sub(r"[A-Z]{2}-\d{4}", "ID", m["content"]) for r in rows for m in r["messages"]
                if m["role"] == "user"}

    def order_ids(rows):
        return {json.loads(c["function"]["arguments"]).get("order_id") for r in rows for m in r["messages"]
                for c in m.get("tool_calls") or []} - {None}
    train, asked = wordings(splits["train"]), wordings(splits["eval"])
    assert len(asked) > 30 and not asked & train
    assert not order_ids(splits["eval"]) & order_ids(splits["train"])
    name, facts, _ = company_facts(0)
    assert {f.questions[4] for f in facts} & asked


def test_the_company_facts_and_files_are_unchanged_by_the_tools():
    """The tools draw from their own seeded RNGs: the company's facts (and every fingerprint of the domain data
    made from them) are what they were."""
    name, facts, unanswerable = company_facts(0)
    assert name == "Corvidworth" and facts[0].answer == "Corvidworth was founded in 1977."
    assert len(facts) == 22 and unanswerable[0] == "What is the stock ticker of Corvidworth?"


# --- tool use is carried through or refused by name, never dropped ------------------------------------------

class Texts:
    """A remote-like target that answers every chat with one text."""

    def __init__(self):
        self.seen = []

    def chat(self, conversations, gen, schedule="together"):
        self.seen += conversations
        return ["Hello!"] * len(conversations)


def test_the_domain_suite_leaves_out_tool_examples_and_says_so(tmp_path):
    from budwood.eval import domain

    path = write_items(tmp_path, [row("one", ("status", {"order_id": "QF-1"})), row("hello", answer="Hello!"),
                                  {"messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "Hello!"}]}])
    target = Texts()
    res = domain.run(EvalContext(target, bootstrap=0), domain.DomainConfig(data=path), None, records=False)
    assert res.metrics["exact_match"].n == 1 and target.seen == [[{"role": "user", "content": "hi"}]]
    assert res.skipped["tool_examples"].startswith("2 example(s) that use tools left out")
    only_tools = write_items(tmp_path, [row("one", ("status", {"order_id": "QF-1"}))], "only.jsonl")
    with pytest.raises(DataError, match="every example uses tools.*--suite tools"):
        domain.run(EvalContext(target, bootstrap=0), domain.DomainConfig(data=only_tools), None, records=False)


def test_reliability_rewrites_keep_tools_and_refusals_need_them(tmp_path):
    from budwood.reliability import items as it

    conv = read_dataset(write_items(tmp_path, [{**row("Status of QF-1?", ("status", {"order_id": "QF-1"})),
                                                "parallel_tool_calls": False}])).conversations[0]
    for rewritten in (it.with_question(conv, "Where is QF-1?"), it.map_turns(conv, lambda m, _: m.content.upper())):
        assert rewritten.tools == conv.tools and rewritten.parallel_tool_calls is False
        assert rewritten.messages[-1].tool_calls == conv.messages[-1].tool_calls and rewritten.source == conv.source
    history = conv.messages  # a user turn and a call
    with pytest.raises(DataError, match="hold tool calls but no tools were given"):
        it.refusal(history, "f:1", "I don't know.")
    with pytest.raises(DataError, match="a preference pair carries no tools"):
        it.refusal(history, "f:1", "I don't know.", rejected="Maybe.", tools=conv.tools)
    built = it.refusal(history, "f:1", "I don't know.", tools=it.offered_tools(conv))
    assert built.tools == conv.tools and built.messages[1].tool_calls and built.messages[1].weight == 0


def test_only_an_adapter_trained_on_tool_calls_lists_the_suite_as_not_measured():
    from budwood.card.render import _applies

    assert _applies(tools, {"data": {"train": {"examples": 9, "tool_examples": 3}}})
    assert not _applies(tools, {"data": {"train": {"examples": 9}}}) and not _applies(tools, {})
    from budwood.eval import grounding

    assert _applies(grounding, {})


def test_a_validation_split_with_plain_chat_is_scored_on_its_tool_examples_and_says_what_it_left_out(tmp_path):
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]}
    path = write_items(tmp_path, [plain, row("one", ("status", {"order_id": "QF-1"}))])
    target = Canned({"one": ToolReply(None, [call("status", order_id="QF-1")])})
    res = tools.run(EvalContext(target, bootstrap=0), tools.ToolsConfig(data=path), None, records=False)
    assert res.metrics["ast_match"].value == 1.0 and res.metrics["call_rate"].n == 1
    assert res.skipped == {"examples_without_tools": "1 example(s) that offer no tools left out: the domain suite "
                                                     "scores them"}


def test_by_default_the_suite_scores_the_demo_companys_held_out_requests():
    class Silent:
        def generate_tools(self, prompts, gen):
            return [ToolReply("Hello.", []) for _ in prompts]

    res = tools.run(EvalContext(Silent(), bootstrap=0), tools.ToolsConfig(), None, records=False)
    assert res.data[0].path == "budwood:data/demo_tools.py#seed=0" and res.metrics["accuracy"].n == 111
    assert res.metrics["ast_match"].value == 0 and res.metrics["irrelevance"].value == 1.0 and res.skipped == {}
