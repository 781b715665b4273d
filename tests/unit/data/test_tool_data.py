"""Tool-calling training data: OpenAI's, TRL's and LLaMA-Factory's forms read into one typed conversation, every
problem an Issue at file:line, rendered with a tool-capable chat template with loss on calls and answers only."""
from __future__ import annotations

import copy
import hashlib
import json

import pytest

from budwood.data.formats import (
    MAX_TOOLS,
    Conversation,
    FunctionCall,
    Message,
    ToolCall,
    _basic_arguments_problem,
    data_fingerprint,
    read_dataset,
)
from budwood.data.stats import tool_stats
from budwood.data.template import IGNORE, encode_conversations
from budwood.errors import DataError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
REFUND = {"type": "function", "function": {"name": "request_refund", "parameters": {
    "type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]}}}
U = {"role": "user", "content": "Weather in Oslo?"}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "RESULT-7 degrees and rain"}
ANSWER = {"role": "assistant", "content": "It is 7 degrees and raining in Oslo."}
GOOD = {"messages": [U, CALL, RESULT, ANSWER], "tools": [WEATHER, REFUND]}

# a Hermes/Qwen-style template: tools listed as JSON in a system block, calls as <tool_call> JSON
TOOL_TEMPLATE = (
    "{%- if tools %}<|system|>\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}<|assistant|>\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}</tool_call>{% endfor %}<|end|>\n"
    "{%- elif m.role == 'tool' %}<|tool|>\n<tool_response>{{ m.content }}</tool_response><|end|>\n"
    "{%- else %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>\n{% endif %}")


def write(tmp_path, rows, name="tools.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read(tmp_path, rows, **kw):
    return read_dataset(write(tmp_path, rows), raise_errors=False, min_examples=0, **kw)


def codes(ds) -> list[tuple[int, str]]:
    return [(i.line, i.code) for i in ds.errors]


@pytest.fixture(scope="module")
def tool_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    return tok


# --- reading ---------------------------------------------------------------------------------------------------

def test_openai_tool_conversation_is_read_into_typed_fields(tmp_path):
    ds = read(tmp_path, [{**GOOD, "parallel_tool_calls": False}])
    assert codes(ds) == [] and ds.format == "openai"
    (conv,) = ds.conversations
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    call = conv.messages[1]
    assert call.content == "" and call.tool_calls == [ToolCall(FunctionCall("get_weather", '{"city": "Oslo"}'),
                                                               "call_1")]
    assert conv.messages[2].tool_call_id == "call_1"
    assert [t.function.name for t in conv.tools] == ["get_weather", "request_refund"]
    assert conv.tools[0].function.parameters["required"] == ["city"] and conv.parallel_tool_calls is False


def test_canonical_form_reads_back_to_the_same_fingerprint(tmp_path):
    ds = read(tmp_path, [GOOD])
    again = read(tmp_path, [ds.conversations[0].canonical()])
    assert codes(again) == [] and again.fingerprint() == ds.fingerprint()


def test_trl_form_object_arguments_no_ids_results_in_order(tmp_path):
    row = {"messages": [U, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"type": "function", "function": {"name": "request_refund", "arguments": {"order": "A1"}}}]},
        {"role": "tool", "name": "get_weather", "content": "7"}, {"role": "tool", "name": "request_refund",
                                                                  "content": "ok"}, ANSWER],
        "tools": [WEATHER, REFUND]}
    ds = read(tmp_path, [row])
    assert codes(ds) == []
    calls = ds.conversations[0].messages[1].tool_calls
    assert [(c.id, json.loads(c.function.arguments)) for c in calls] == [(None, {"city": "Oslo"}),
                                                                          (None, {"order": "A1"})]
    swapped = copy.deepcopy(row)
    swapped["messages"][2]["name"], swapped["messages"][3]["name"] = "request_refund", "get_weather"
    assert codes(read(tmp_path, [swapped])) == [(1, "tool_name_mismatch"), (1, "tool_name_mismatch")]


def test_llama_factory_sharegpt_function_call_and_observation(tmp_path):
    bare = [WEATHER["function"], REFUND["function"]]
    row = {"conversations": [
        {"from": "human", "value": "Weather in Oslo, and refund A1?"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}},
                                                       {"name": "request_refund", "arguments": {"order": "A1"}}])},
        {"from": "observation", "value": "7 degrees"}, {"from": "observation", "value": "refunded"},
        {"from": "gpt", "value": "7 degrees; refunded."}], "system": "Be brief.", "tools": json.dumps(bare)}
    ds = read(tmp_path, [row])
    assert codes(ds) == [] and ds.format == "sharegpt"
    conv = ds.conversations[0]
    assert [m.role for m in conv.messages] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert [c.function.name for c in conv.messages[2].tool_calls] == ["get_weather", "request_refund"]
    assert conv.tools[1].as_dict() == REFUND
    unknown = copy.deepcopy(row)
    unknown["conversations"][1]["value"] = json.dumps({"name": "get_wether", "arguments": {"city": "Oslo"}})
    assert codes(read(tmp_path, [unknown])) == [(1, "unknown_function"), (1, "orphan_tool_result")]


def _with(messages=None, tools=(WEATHER, REFUND), **extra):
    return {"messages": messages or [U, CALL, RESULT, ANSWER], **({"tools": list(tools)} if tools else {}), **extra}


def _call(name="get_weather", arguments='{"city": "Oslo"}', id="call_1"):
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}]}


DEEP = "[" * 5000 + "]" * 5000
BAD = [
    ("arguments_not_json", _with([U, _call(arguments='{"city": '), RESULT, ANSWER]), "bad_tool_arguments"),
    ("arguments_not_object", _with([U, _call(arguments='["Oslo"]'), RESULT, ANSWER]), "bad_tool_arguments"),
    ("arguments_missing", _with([U, {**CALL, "tool_calls": [{"id": "call_1", "function": {"name": "get_weather"}}]},
                                 RESULT, ANSWER]), "bad_tool_arguments"),
    ("arguments_deep", _with([U, _call(arguments=DEEP), RESULT, ANSWER]), "bad_tool_arguments"),
    ("unknown_function", _with([U, _call(name="get_wether"), RESULT, ANSWER]), "unknown_function"),
    ("no_tools_declared", _with(tools=()), "unknown_function"),
    ("missing_required", _with([U, _call(arguments='{"days": 2}'), RESULT, ANSWER]), "arguments_schema"),
    ("wrong_type", _with([U, _call(arguments='{"city": "Oslo", "days": "two"}'), RESULT, ANSWER]),
     "arguments_schema"),
    ("orphan_result", _with([U, RESULT, ANSWER]), "orphan_tool_result"),
    ("id_mismatch", _with([U, CALL, {**RESULT, "tool_call_id": "call_9"}, ANSWER]), "tool_call_id_mismatch"),
    ("id_missing", _with([U, CALL, {"role": "tool", "content": "x"}, ANSWER]), "missing_tool_call_id"),
    ("id_repeated", _with([U, CALL, RESULT, CALL, RESULT, ANSWER]), "duplicate_tool_call_id"),
    ("unanswered", _with([U, CALL, ANSWER]), "unanswered_tool_call"),
    ("answered_twice", _with([U, CALL, RESULT, RESULT, ANSWER]), "orphan_tool_result"),
    ("calls_on_user", _with([{**U, "tool_calls": CALL["tool_calls"]}, ANSWER]), "invalid_tool_calls"),
    ("call_id_on_user", _with([{**U, "tool_call_id": "call_1"}, ANSWER]), "invalid_tool_call_id"),
    ("call_without_function", _with([U, {**CALL, "tool_calls": [{"id": "c"}]}, ANSWER]), "invalid_tool_call"),
    ("ids_mixed", _with([U, {**CALL, "tool_calls": [CALL["tool_calls"][0], {"function": {
        "name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]}, ANSWER]), "invalid_tool_call"),
    ("parallel_off", _with([U, {**CALL, "tool_calls": [CALL["tool_calls"][0], {"id": "call_2", "function": {
        "name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]}, RESULT, {**RESULT, "tool_call_id": "call_2"},
        ANSWER], parallel_tool_calls=False), "parallel_tool_calls"),
    ("parallel_not_bool", _with(parallel_tool_calls="yes"), "invalid_type"),
    ("legacy_function_call", _with([U, {"role": "assistant", "content": None, "function_call": {"name": "f"}}]),
     "unsupported_key"),
    ("tool_bad_name", _with(tools=[{"type": "function", "function": {"name": "get weather!"}}]), "invalid_tool"),
    ("tool_wrong_type", _with(tools=[{"type": "retrieval", "function": WEATHER["function"]}]), "invalid_tool"),
    ("tool_parameters_not_object", _with(tools=[{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "string"}}}]), "invalid_tool"),
    ("tool_schema_invalid", _with(tools=[{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "strin"}}}}}]),
     "invalid_tool"),
    ("tool_duplicate", _with(tools=[WEATHER, WEATHER]), "duplicate_tool"),
    ("tools_not_list", {**_with(tools=()), "tools": {"get_weather": {}}}, "invalid_tools"),
    ("tools_string_not_json", {**_with(tools=()), "tools": "[{"}, "invalid_tools"),
    ("too_many_tools", _with(tools=[{"type": "function", "function": {"name": f"f{k}"}}
                                    for k in range(MAX_TOOLS + 1)]), "too_many_tools"),
    ("schema_too_deep", _with(tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"a": json.loads('{"items": ' * 20 + "{}" + "}" * 20)}}}}]),
     "schema_too_large"),
    ("schema_too_big", _with(tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "description": "x" * 40_000}}}]), "schema_too_large"),
]


@pytest.mark.parametrize(("row", "code"), [pytest.param(r, c, id=i) for i, r, c in BAD])
def test_each_tool_problem_is_an_issue_at_its_line(tmp_path, row, code):
    ds = read(tmp_path, [GOOD, row])
    assert (2, code) in codes(ds), [str(i) for i in ds.issues]
    assert len(ds.conversations) == 1 and all(i.line == 2 for i in ds.errors)
    issue = next(i for i in ds.errors if i.code == code)
    assert str(issue).startswith(f"{tmp_path / 'tools.jsonl'}:2: {code}: ")


def test_messages_name_what_is_wrong(tmp_path):
    ds = read(tmp_path, [_with([U, _call(name="get_wether"), RESULT, ANSWER]),
                         _with([U, _call(arguments='{"days": 2}'), RESULT, ANSWER]),
                         _with([U, CALL, {**RESULT, "tool_call_id": "call_9"}, ANSWER])])
    by_code = {i.code: i.message for i in ds.errors}
    assert by_code["unknown_function"] == ("message 1 (assistant) calls 'get_wether', which is not in the example's "
                                           "tools (did you mean 'get_weather'?)")
    assert "'city' is a required property" in by_code["arguments_schema"]
    assert by_code["tool_call_id_mismatch"].endswith("tool_call_id 'call_9' matches no open call; open calls: "
                                                     "'call_1'")


def test_basic_schema_check_without_jsonschema():
    """The fallback used where jsonschema is not installed: required keys, property types, enums."""
    schema = {"type": "object", "properties": {"days": {"type": "integer"}, "unit": {"enum": ["C", "F"]}},
              "required": ["city"]}
    assert _basic_arguments_problem({"days": 2}, schema, "arguments") == "arguments lacks required 'city'"
    assert "must be integer" in _basic_arguments_problem({"city": "x", "days": True}, schema, "arguments")
    assert "must be one of" in _basic_arguments_problem({"city": "x", "unit": "K"}, schema, "arguments")
    assert _basic_arguments_problem({"city": "x", "days": 2, "unit": "C"}, schema, "arguments") is None


def test_preference_data_still_refuses_tool_calls(tmp_path):
    row = {"input": {"messages": [U]}, "preferred_output": [CALL], "non_preferred_output": [ANSWER]}
    assert ("unsupported_key" in [c for _, c in codes(read(tmp_path, [row]))])


# --- fingerprint -----------------------------------------------------------------------------------------------

def test_fingerprint_of_tool_free_data_is_unchanged(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 1}]},
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]
    for k, row in enumerate(rows):
        ds = read_dataset(write(tmp_path, [row], f"free{k}.jsonl"), min_examples=0)
        old = [{"role": m.role, "content": m.content, **({"weight": m.weight} if m.weight is not None else {})}
               for m in ds.conversations[0].messages]  # the canonical form as it was before tools
        expected = hashlib.sha256(json.dumps({"messages": old}, sort_keys=True, ensure_ascii=False).encode() + b"\n")
        assert ds.fingerprint() == "sha256:" + expected.hexdigest()


def test_fingerprint_changes_with_tools_and_calls(tmp_path):
    base = read(tmp_path, [GOOD]).fingerprint()
    other_tools = read(tmp_path, [{**GOOD, "tools": [WEATHER]}]).fingerprint()
    other_args = read(tmp_path, [_with([U, _call(arguments='{"city": "Bergen"}'), RESULT, ANSWER])]).fingerprint()
    other_id = read(tmp_path, [_with([U, _call(id="call_2"), {**RESULT, "tool_call_id": "call_2"}, ANSWER])])
    assert len({base, other_tools, other_args, other_id.fingerprint()}) == 4
    plain = Conversation([Message("user", "a"), Message("assistant", "b")])
    assert data_fingerprint([plain]) != data_fingerprint([Conversation(plain.messages, tools=read(
        tmp_path, [GOOD]).conversations[0].tools)])


# --- rendering and the loss mask ----------------------------------------------------------------------------------

def test_loss_on_calls_and_answers_never_on_tool_results(tmp_path, tool_tokenizer):
    conv = read(tmp_path, [GOOD]).conversations[0]
    (enc,) = encode_conversations(tool_tokenizer, [conv], 4096)
    text = tool_tokenizer.decode(enc.input_ids)
    assert '"name": "get_weather"' in text and "Current weather in a city" in text  # tools reach the template
    trained = tool_tokenizer.decode([t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE])
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in trained
    assert "It is 7 degrees and raining in Oslo." in trained
    assert "RESULT-7" not in trained and "RESULT-7" in text
    assert "Weather in Oslo?" not in trained and "Current weather" not in trained


def test_tool_free_rendering_does_not_pass_tools(tmp_path, tiny_tokenizer):
    conv = read(tmp_path, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
                ).conversations[0]
    (enc,) = encode_conversations(tiny_tokenizer, [conv], 512)
    expected = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "yo"}], tokenize=False)
    assert tiny_tokenizer.decode(enc.input_ids) == expected


# budwood-tiny's template before it learnt tools: each message's role and content, nothing else
TOOL_FREE_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + "
                      "message['content'] + '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                      "{{ '<|assistant|>\n' }}{% endif %}")


def test_template_without_tool_support_is_a_clear_error(tmp_path, tiny_tokenizer):
    conv = read(tmp_path, [GOOD]).conversations[0]
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TOOL_FREE_TEMPLATE
    with pytest.raises(DataError, match="has no tool support: it ignores the tools, assistant tool_calls") as e:
        encode_conversations(tok, [conv], 4096)
    assert tok.name_or_path in str(e.value)


def test_budwood_tiny_renders_tools_calls_and_results(tmp_path, tiny_tokenizer):
    conv = read(tmp_path, [GOOD]).conversations[0]
    (enc,) = encode_conversations(tiny_tokenizer, [conv], 4096)
    text = tiny_tokenizer.decode(enc.input_ids)
    assert "<tools>" in text and '"name": "get_weather"' in text
    assert "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {" in text
    assert "<tool_response>" in text


def test_template_that_drops_results_is_refused(tool_tokenizer):
    tok = copy.deepcopy(tool_tokenizer)
    tok.chat_template = TOOL_TEMPLATE.replace("<tool_response>{{ m.content }}</tool_response>", "")
    conv = Conversation([Message("user", "q"), Message("assistant", "a")], tools=None)
    conv.messages[1].tool_calls = [ToolCall(FunctionCall("f", "{}"), "c")]
    with pytest.raises(DataError, match="ignores tool results"):
        encode_conversations(tok, [conv], 512)


# --- summary -------------------------------------------------------------------------------------------------------

def test_tool_stats_and_data_check_summary(tmp_path):
    from typer.testing import CliRunner

    from budwood.cli import app

    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write(tmp_path, [GOOD, plain, {"messages": [U, ANSWER], "tools": [WEATHER]}])
    stats = tool_stats(read_dataset(path).examples)
    assert (stats.with_tools, stats.with_calls, stats.calls, stats.results, stats.functions) == (2, 1, 1, 1, 1)
    result = CliRunner().invoke(app, ["data", "check", str(path), "--min-examples", "1"])
    assert "tool use: 2 example(s) declare tools, 1 call them (1 call(s) of 1 function(s), 1 tool result(s))" \
        in result.output
    assert result.exit_code == 0 and "has no tool support" not in result.output, result.output
