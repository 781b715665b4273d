"""Tool calls read from model text (both template families), streamed as OpenAI deltas, and forced by grammar."""
from __future__ import annotations

import json

import llguidance
import llguidance.hf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budwood.engine.tools import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    ToolCallStream,
    ToolFormat,
    parse_tool_calls,
    template_tool_format,
    tool_call_grammar,
)
from budwood.models.load import load_tokenizer

H, L = ToolFormat.HERMES, ToolFormat.LLAMA3_JSON
ORDER = {"type": "function", "function": {"name": "order_status", "parameters": {
    "type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}
REFUND = {"type": "function", "function": {"name": "request_refund", "parameters": {
    "type": "object", "properties": {"order_id": {"type": "string"}, "reason": {"enum": ["damaged", "late"]}},
    "required": ["order_id", "reason"], "additionalProperties": False}}}
TWO = ('Let me look.<tool_call>\n{"name": "order_status", "arguments": {"order_id": "A17"}}\n</tool_call>\n'
       '<tool_call>\n{"name": "request_refund", "arguments": {"order_id": "A17", "reason": "late"}}\n</tool_call>')


def named(reply) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in reply.tool_calls]


def test_the_format_is_read_from_the_template():
    tiny = load_tokenizer("budwood-tiny").chat_template
    assert template_tool_format(tiny) is H
    llama = '{% if tools %}{{ tools | tojson }} Respond with {"name": function name, "parameters": ...}{% endif %}'
    assert template_tool_format(llama) is L
    assert template_tool_format("{{ messages[0]['content'] }}") is None
    assert template_tool_format(None) is None


def test_hermes_calls_and_the_text_before_them():
    reply = parse_tool_calls(TWO, H)
    assert reply.content == "Let me look."
    assert named(reply) == [("order_status", {"order_id": "A17"}), ("request_refund", {"order_id": "A17",
                                                                                          "reason": "late"})]
    assert len({c.id for c in reply.tool_calls}) == 2 and all(c.id.startswith("call_") for c in reply.tool_calls)
    plain = parse_tool_calls("Just text.", H)
    assert plain.content == "Just text." and not plain.tool_calls


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "order_status", "arguments": {"order_id": "A1"\n</tool_call>',  # cut short
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',  # arguments not an object
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><tool_call>nonsense</tool_call>',  # one bad of two
])
def test_an_answer_whose_calls_do_not_all_parse_is_text(text):
    reply = parse_tool_calls(text, H)
    assert reply.content == text and reply.tool_calls == []


def test_an_unterminated_last_call_that_parses_is_a_call():
    reply = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"a": 1}}', H)
    assert named(reply) == [("f", {"a": 1})]


def test_llama3_json_calls():
    reply = parse_tool_calls('<|python_tag|>{"name": "order_status", "parameters": {"order_id": "A17"}}; '
                             '{"name": "request_refund", "parameters": {"order_id": "A17", "reason": "late"}}', L)
    assert reply.content is None and [n for n, _ in named(reply)] == ["order_status", "request_refund"]
    assert parse_tool_calls("The order has shipped.", L).tool_calls == []
    assert parse_tool_calls('{"name": "f", "parameters": {}} and then', L).content.endswith("and then")


def replay(text: str, fmt: ToolFormat, cuts: list[int]) -> list:
    stream, events, at = ToolCallStream(fmt), [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        events += stream.feed(text[at:cut])
        at = max(at, cut)
    return events + stream.finish()


def assemble(events: list) -> tuple[str, list[tuple[str, str]]]:
    content, calls = "", {}
    for e in events:
        if isinstance(e, ContentDelta):
            content += e.text
        elif isinstance(e, CallStart):
            assert e.index not in calls and e.index == len(calls) and e.id.startswith("call_")
            calls[e.index] = [e.name, ""]
        else:
            assert isinstance(e, ArgumentsDelta) and e.index in calls
            calls[e.index][1] += e.text
    return content, [tuple(c) for c in calls.values()]


@settings(max_examples=150, deadline=None)
@given(cuts=st.lists(st.integers(0, len(TWO)), max_size=30))
def test_a_stream_cut_anywhere_gives_what_the_whole_text_gives(cuts):
    content, calls = assemble(replay(TWO, H, cuts))
    whole = parse_tool_calls(TWO, H)
    assert content == whole.content
    assert [(n, json.loads(a)) for n, a in calls] == named(whole)


def test_a_stream_sends_the_name_before_the_arguments_end():
    stream = ToolCallStream(H)
    head = 'Sure.<tool_call>\n{"name": "order_status", "arguments": {"order_'
    events = stream.feed(head)
    assert assemble(events) == ("Sure.", [("order_status", '{"order_')])
    more = stream.feed('id": "A17"}}\n</tool_call>') + stream.finish()
    assert assemble(events + more)[1] == [("order_status", '{"order_id": "A17"}')]
    assert stream.called


def test_a_stream_holds_back_only_what_could_begin_a_call():
    stream = ToolCallStream(H)
    assert assemble(stream.feed("Order A17 <tool"))[0] == "Order A17 "
    assert assemble(stream.feed("kit> is late."))[0] == "<toolkit> is late."
    assert stream.finish() == [] and not stream.called


def test_a_stream_of_text_that_never_closes_a_call_sends_it_as_text():
    content, calls = assemble(replay("Hi <tool_call> oops", H, [3, 9]))
    assert (content, calls) == ("Hi <tool_call> oops", [])


def test_llama_stream_holds_a_call_and_streams_text():
    text = '{"name": "order_status", "parameters": {"order_id": "A17"}}'
    assert assemble(replay(text, L, [1, 5, 20])) == ("", [("order_status", '{"order_id": "A17"}')])
    assert assemble(replay("It shipped.", L, [1, 4])) == ("It shipped.", [])


@pytest.fixture(scope="module")
def ll_tokenizer():
    tok = load_tokenizer("budwood-tiny")
    return tok, llguidance.hf.from_tokenizer(tok, n_vocab=len(tok), eos_token=[tok.eos_token_id])


def accepts(ll_tokenizer, grammar: str, text: str) -> bool:
    tok, ll = ll_tokenizer
    matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


@pytest.mark.parametrize("fmt", [H, L])
def test_the_grammar_takes_calls_to_the_tools_written_as_the_template_writes_them(ll_tokenizer, fmt):
    key = "arguments" if fmt is H else "parameters"
    one = f'{{"name": "order_status", "{key}": {{"order_id": "A17"}}}}'
    two = f'{{"name": "request_refund", "{key}": {{"order_id": "A17", "reason": "late"}}}}'
    wrap = (lambda c: f"<tool_call>\n{c}\n</tool_call>") if fmt is H else (lambda c: c)
    sep = "\n" if fmt is H else "; "
    single, parallel = tool_call_grammar(fmt, [ORDER, REFUND], False), tool_call_grammar(fmt, [ORDER, REFUND], True)
    assert accepts(ll_tokenizer, single, wrap(one)) and accepts(ll_tokenizer, single, wrap(two))
    assert not accepts(ll_tokenizer, single, wrap(one) + sep + wrap(two))
    assert accepts(ll_tokenizer, parallel, wrap(one) + sep + wrap(two))
    for bad in (one.replace("order_status", "cancel"),  # not a tool
                two.replace('"late"', '"bored"'),  # against the schema's enum
                two.replace(', "reason": "late"', ""),  # a required argument missing
                one.replace('": "A17', '":"A17')):  # not the template's spacing
        assert not accepts(ll_tokenizer, single, wrap(bad)), bad
    assert not accepts(ll_tokenizer, single, "Your order has shipped.")
