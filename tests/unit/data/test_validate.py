"""Validation of malformed JSONL training data: every problem is an Issue at the right file:line."""
from __future__ import annotations

import json

import pytest

from budwood.data.formats import Issue, read_dataset
from budwood.errors import DataError

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
S = {"role": "system", "content": "be brief"}


def j(obj) -> str:
    return json.dumps(obj)


def msgs(*messages, **extra) -> str:
    return j({"messages": list(messages), **extra})


GOOD_OPENAI = msgs(U, A)
GOOD_PC = j({"prompt": "p", "completion": "c"})
GOOD_ALPACA = j({"instruction": "i", "output": "o"})
GOOD_SHAREGPT = j({"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]})


def lines(*ls: str) -> str:
    return "\n".join(ls) + "\n"


def row(id: str, content: str | bytes, code: str, line: int, **kwargs):
    """One malformed input: file content, the error code expected, its line, read_dataset kwargs."""
    return pytest.param(content, code, line, kwargs, id=id)


def write(tmp_path, content: str | bytes, name: str = "data.jsonl"):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def read(tmp_path, content, **kwargs):
    return read_dataset(write(tmp_path, content), raise_errors=False, **kwargs)


def errors(ds) -> list[tuple[str, int]]:
    return [(i.code, i.line) for i in ds.issues if i.level == "error"]


MALFORMED = [
    # --- not JSON / not an object ---------------------------------------------------------------
    row("invalid_json", '{"messages": [}\n', "invalid_json", 1),
    row("invalid_json_line3", lines(GOOD_PC, GOOD_PC, '{"prompt": "a" "completion": "b"}'),
        "invalid_json", 3),
    row("invalid_json_truncated", lines(GOOD_PC, '{"prompt": "a", "completion": "b"'), "invalid_json", 2),
    row("invalid_json_single_quotes", "{'prompt': 'a', 'completion': 'b'}\n", "invalid_json", 1),
    row("not_object_array", "[1, 2]\n", "not_an_object", 1),
    row("not_object_number", lines(GOOD_OPENAI, "42"), "not_an_object", 2),
    row("not_object_string", '"hello"\n', "not_an_object", 1),
    row("not_object_null", "null\n", "not_an_object", 1),
    # --- format detection ------------------------------------------------------------------------
    row("unknown_format", j({"text": "hi", "label": 1}) + "\n", "unknown_format", 1),
    row("format_mismatch_openai_then_pc", lines(GOOD_OPENAI, GOOD_PC), "format_mismatch", 2),
    row("format_mismatch_sharegpt_then_alpaca", lines(GOOD_SHAREGPT, GOOD_SHAREGPT, GOOD_ALPACA),
        "format_mismatch", 3),
    row("named_format_alpaca_on_openai", lines(GOOD_OPENAI), "format_mismatch", 1, format="alpaca"),
    # --- openai: messages list -------------------------------------------------------------------
    row("messages_null", j({"messages": None}) + "\n", "missing_messages", 1),
    row("messages_missing_named_openai", j({"id": 7}) + "\n", "missing_messages", 1, format="openai"),
    row("messages_string", j({"messages": "hi"}) + "\n", "messages_not_list", 1),
    row("messages_object", j({"messages": {"role": "user"}}) + "\n", "messages_not_list", 1),
    row("messages_empty", j({"messages": []}) + "\n", "empty_messages", 1),
    row("message_not_object", msgs("hi", A) + "\n", "message_not_object", 1),
    # --- openai: each message --------------------------------------------------------------------
    row("missing_role", msgs({"content": "hi"}, A) + "\n", "missing_role", 1),
    row("unknown_role", msgs(U, {"role": "asistant", "content": "x"}) + "\n", "unknown_role", 1),
    row("unknown_role_function", msgs(U, A, {"role": "function", "content": "x"}) + "\n", "unknown_role", 1),
    row("tool_answering_no_call", msgs(U, A, {"role": "tool", "content": "x"}) + "\n", "orphan_tool_result", 1),
    row("missing_content", msgs(U, {"role": "assistant"}) + "\n", "missing_content", 1),
    row("content_null", msgs({"role": "user", "content": None}, A) + "\n", "missing_content", 1),
    row("content_number", msgs(U, {"role": "assistant", "content": 42}) + "\n", "invalid_content", 1),
    row("content_object", msgs({"role": "user", "content": {"text": "x"}}, A) + "\n", "invalid_content", 1),
    row("content_parts_image", msgs({"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]}, A) + "\n",
        "invalid_content", 1),
    row("content_parts_no_text", msgs({"role": "user", "content": [{"type": "text"}]}, A) + "\n",
        "invalid_content", 1),
    row("unknown_message_key", msgs({"role": "user", "contnet": "hi"}, A) + "\n", "unknown_key", 1),
    row("tool_calls_without_function", msgs(U, {**A, "tool_calls": [{"id": "1"}]}) + "\n", "invalid_tool_call", 1),
    row("function_call", msgs(U, {**A, "function_call": {"name": "f"}}) + "\n", "unsupported_key", 1),
    # --- openai: weights -------------------------------------------------------------------------
    row("weight_2", msgs(U, {**A, "weight": 2}) + "\n", "invalid_weight", 1),
    row("weight_string", msgs(U, {**A, "weight": "1"}) + "\n", "invalid_weight", 1),
    row("weight_bool", msgs(U, {**A, "weight": True}) + "\n", "invalid_weight", 1),
    row("weight_on_user", msgs({**U, "weight": 1}, A) + "\n", "invalid_weight", 1),
    # --- whole-conversation checks ---------------------------------------------------------------
    row("no_assistant", msgs(S, U) + "\n", "no_assistant_message", 1),
    row("all_weights_zero", msgs(U, {**A, "weight": 0}, U, {**A, "weight": 0}) + "\n",
        "no_trainable_assistant", 1),
    row("empty_assistant", msgs(U, {"role": "assistant", "content": ""}) + "\n", "empty_content", 1),
    row("blank_assistant", lines(GOOD_OPENAI, msgs(U, {"role": "assistant", "content": " \n\t"})),
        "empty_content", 2),
    # --- prompt / completion ---------------------------------------------------------------------
    row("pc_missing_completion", j({"prompt": "p"}) + "\n", "missing_field", 1),
    row("pc_missing_prompt", lines(GOOD_PC, j({"completion": "c"})), "missing_field", 2),
    row("pc_prompt_null", j({"prompt": None, "completion": "c"}) + "\n", "missing_field", 1),
    row("pc_completion_number", j({"prompt": "p", "completion": 3}) + "\n", "invalid_type", 1),
    row("pc_prompt_list", j({"prompt": ["p"], "completion": "c"}) + "\n", "invalid_type", 1),
    row("pc_unknown_key", j({"prompt": "p", "completion": "c", "response": "r"}) + "\n", "unknown_key", 1),
    row("pc_empty_completion", j({"prompt": "p", "completion": ""}) + "\n", "empty_content", 1),
    # --- alpaca ----------------------------------------------------------------------------------
    row("alpaca_missing_output", j({"instruction": "i", "input": "x"}) + "\n", "missing_field", 1),
    row("alpaca_missing_instruction", lines(GOOD_ALPACA, j({"input": "x", "output": "o"})),
        "missing_field", 2),
    row("alpaca_input_number", j({"instruction": "i", "input": 5, "output": "o"}) + "\n", "invalid_type", 1),
    row("alpaca_unknown_key", j({"instruction": "i", "output": "o", "history": []}) + "\n", "unknown_key", 1),
    # --- sharegpt --------------------------------------------------------------------------------
    row("sharegpt_not_list", j({"conversations": "hi"}) + "\n", "messages_not_list", 1),
    row("sharegpt_empty", j({"conversations": []}) + "\n", "empty_messages", 1),
    row("sharegpt_turn_not_object", j({"conversations": ["hi", {"from": "gpt", "value": "g"}]}) + "\n",
        "message_not_object", 1),
    row("sharegpt_unknown_from", j({"conversations": [{"from": "humman", "value": "h"},
                                                      {"from": "gpt", "value": "g"}]}) + "\n",
        "unknown_role", 1),
    row("sharegpt_missing_from", j({"conversations": [{"value": "h"}, {"from": "gpt", "value": "g"}]}) + "\n",
        "missing_role", 1),
    row("sharegpt_missing_value", j({"conversations": [{"from": "human"}, {"from": "gpt", "value": "g"}]})
        + "\n", "missing_content", 1),
    row("sharegpt_no_gpt", j({"conversations": [{"from": "human", "value": "h"}]}) + "\n",
        "no_assistant_message", 1),
    # --- file level ------------------------------------------------------------------------------
    row("non_utf8", GOOD_PC.encode() + b"\n" + b'{"prompt": "caf\xe9", "completion": "c"}\n',
        "invalid_encoding", 2),
    row("empty_file", "", "empty_file", 0),
    row("only_blank_lines", "\n   \n\t\n\n", "empty_file", 0),
    row("too_few_examples", lines(GOOD_PC, GOOD_PC), "too_few_examples", 0, min_examples=3),
    row("too_few_after_errors", lines(GOOD_PC, "[]"), "too_few_examples", 0, min_examples=2),
]


@pytest.mark.parametrize(("content", "code", "line", "kwargs"), MALFORMED)
def test_malformed_input_reports_error(tmp_path, content, code, line, kwargs):
    ds = read(tmp_path, content, **kwargs)
    assert (code, line) in errors(ds), [str(i) for i in ds.issues]
    path = str(tmp_path / "data.jsonl")
    for issue in ds.issues:
        assert issue.file == path
        assert str(issue) == f"{path}:{issue.line}: {issue.code}: {issue.message}"
    # an example with an error is never kept
    assert all(c.source != f"{path}:{line}" for c in ds.conversations)


def test_table_is_large_enough():
    assert len(MALFORMED) >= 35
    assert len({p.id for p in MALFORMED}) == len(MALFORMED)


# --- exact issue lists -----------------------------------------------------------------------------


def test_invalid_json_exact_issues_with_column(tmp_path):
    ds = read(tmp_path, lines(GOOD_PC, '{"prompt": "a" "completion": "b"}'))
    assert [(i.line, i.code, i.level, i.message) for i in ds.issues] == [
        (2, "invalid_json", "error", "column 16: Expecting ',' delimiter"),
    ]
    assert len(ds.conversations) == 1


@pytest.mark.parametrize(("text", "column"), [
    ('{"messages": [}', 15),
    ('{"prompt": "a", "completion": "b"', 34),
    ("{'prompt': 'a'}", 2),
])
def test_invalid_json_message_names_column(tmp_path, text, column):
    ds = read(tmp_path, text + "\n")
    (issue,) = [i for i in ds.issues if i.code == "invalid_json"]
    assert issue.message.startswith(f"column {column}: ")


def test_not_an_object_names_type(tmp_path):
    ds = read(tmp_path, lines("[1]", "42", '"s"', "true", GOOD_PC))
    got = [(i.line, i.message) for i in ds.issues if i.code == "not_an_object"]
    assert got == [
        (1, "each record must be a JSON object, got list"),
        (2, "each record must be a JSON object, got int"),
        (3, "each record must be a JSON object, got str"),
        (4, "each record must be a JSON object, got bool"),
    ]


def test_unknown_role_exact_with_did_you_mean(tmp_path):
    ds = read(tmp_path, msgs(U, {"role": "asistant", "content": "x"}) + "\n")
    assert [(i.line, i.code, i.level, i.message) for i in ds.issues] == [
        (1, "unknown_role", "error",
         "messages[1] role 'asistant' is not one of system, user, assistant, tool (did you mean 'assistant'?)"),
        (0, "too_few_examples", "error", "0 valid examples, at least 1 needed"),
    ]


def test_unknown_role_without_close_match_has_no_suggestion(tmp_path):
    ds = read(tmp_path, msgs(U, A, {"role": "narrator", "content": "x"}) + "\n")
    (issue,) = [i for i in ds.issues if i.code == "unknown_role"]
    assert "did you mean" not in issue.message
    assert issue.message.startswith("messages[2] role 'narrator'")


def test_unknown_message_key_did_you_mean_and_missing_content(tmp_path):
    ds = read(tmp_path, msgs({"role": "user", "contnet": "hi"}, A) + "\n")
    assert [(i.line, i.code) for i in ds.issues] == [
        (1, "unknown_key"), (1, "missing_content"), (0, "too_few_examples")]
    assert ds.issues[0].message == ("messages[0] has unknown key 'contnet' (did you mean 'content'?); "
                                    "expected role, content, weight, name, tool_calls, tool_call_id")
    assert ds.issues[1].message == "messages[0] (user) has no 'content'"


def test_legacy_function_call_message_is_clear(tmp_path):
    ds = read(tmp_path, msgs(U, {**A, "function_call": {"name": "f"}}) + "\n")
    (issue,) = [i for i in ds.issues if i.code == "unsupported_key"]
    assert issue.message == ("messages[1] has 'function_call': the legacy function_call form is not supported; "
                             "write 'tool_calls'")
    assert not [i for i in ds.issues if i.code == "unknown_key"]  # not reported twice


@pytest.mark.parametrize(("weight", "shown"), [(2, "2"), ("1", "'1'"), (True, "True"), (-1, "-1"),
                                                (0.5, "0.5"), (None, None)])
def test_weight_values(tmp_path, weight, shown):
    ds = read(tmp_path, msgs(U, {**A, "weight": weight}) + "\n")
    if shown is None:  # "weight": null is the same as no weight
        assert ds.issues == [] and ds.conversations[0].messages[1].weight is None
        return
    assert [(i.line, i.code, i.message) for i in ds.errors][0] == (
        1, "invalid_weight", f"messages[1] 'weight' must be 0 or 1, got {shown}")


def test_weight_on_user_message_exact(tmp_path):
    ds = read(tmp_path, msgs({**U, "weight": 0}, A) + "\n")
    assert [(i.line, i.code, i.message) for i in ds.errors] == [
        (1, "invalid_weight", "messages[0] 'weight' is only allowed on assistant messages"),
        (0, "too_few_examples", "0 valid examples, at least 1 needed"),
    ]


def test_sharegpt_unknown_from_did_you_mean(tmp_path):
    ds = read(tmp_path, j({"conversations": [{"from": "humman", "value": "h"},
                                             {"from": "gpt", "value": "g"}]}) + "\n")
    (issue,) = [i for i in ds.issues if i.code == "unknown_role"]
    assert "conversations[0] 'from' 'humman'" in issue.message
    assert issue.message.endswith("(did you mean 'human'?)")


def test_prompt_completion_missing_both_reports_both(tmp_path):
    ds = read(tmp_path, j({"prompt": None}) + "\n", format="prompt_completion")
    assert [(i.code, i.message) for i in ds.errors] == [
        ("missing_field", "record has no 'prompt'"),
        ("missing_field", "record has no 'completion'"),
        ("too_few_examples", "0 valid examples, at least 1 needed"),
    ]


def test_empty_file_exact(tmp_path):
    ds = read(tmp_path, "")
    assert [(i.line, i.code, i.level, i.message) for i in ds.issues] == [
        (0, "empty_file", "error", "the file has no records")]
    assert str(ds.issues[0]) == f"{tmp_path / 'data.jsonl'}:0: empty_file: the file has no records"


def test_only_blank_lines_exact(tmp_path):
    ds = read(tmp_path, "\n  \n\r\n\t\n")
    assert [(i.line, i.code) for i in ds.issues] == [(0, "empty_file")]


def test_too_few_examples_exact(tmp_path):
    ds = read(tmp_path, lines(GOOD_PC, GOOD_PC), min_examples=3)
    assert [(i.line, i.code, i.message) for i in ds.issues] == [
        (0, "too_few_examples", "2 valid examples, at least 3 needed")]
    assert len(ds.conversations) == 2


def test_non_utf8_reports_byte_and_keeps_other_lines(tmp_path):
    ds = read(tmp_path, GOOD_PC.encode() + b"\n" + b'{"prompt": "caf\xe9"}\n' + GOOD_PC.encode() + b"\n")
    assert [(i.line, i.code, i.message) for i in ds.issues] == [
        (2, "invalid_encoding", "not UTF-8 at byte 16")]
    assert [c.source.rsplit(":", 1)[1] for c in ds.conversations] == ["1", "3"]


# --- several errors at once ------------------------------------------------------------------------


def test_every_bad_line_is_reported_in_one_pass(tmp_path):
    content = lines(
        GOOD_OPENAI,                                           # 1 ok
        msgs(U, {"role": "asistant", "content": "x"}),         # 2 unknown_role
        "",                                                    # 3 blank: skipped, still counted
        GOOD_OPENAI,                                           # 4 ok
        '{"messages": [',                                      # 5 invalid_json
        msgs(U, {**A, "weight": 2}),                           # 6 invalid_weight
    )
    ds = read(tmp_path, content)
    assert errors(ds) == [("unknown_role", 2), ("invalid_json", 5), ("invalid_weight", 6)]
    assert [c.source.rsplit(":", 1)[1] for c in ds.conversations] == ["1", "4"]


def test_several_errors_on_one_line_all_reported(tmp_path):
    ds = read(tmp_path, msgs({"role": "usr", "content": "a"}, {"content": "b"}, {**A, "weight": "1"}) + "\n")
    assert errors(ds) == [("unknown_role", 1), ("missing_role", 1), ("invalid_weight", 1),
                          ("too_few_examples", 0)]


def test_raise_errors_lists_every_issue(tmp_path):
    path = write(tmp_path, lines(
        GOOD_PC, "[1]", j({"prompt": "p", "completion": 1}), GOOD_PC, j({"prompt": "p"}),
        j({"prompt": "p", "completion": "c", "extra": 1})))
    with pytest.raises(DataError) as exc:
        read_dataset(path)
    err = exc.value
    expected = [(2, "not_an_object"), (3, "invalid_type"), (5, "missing_field"), (6, "unknown_key")]
    msg = str(err)
    assert msg.startswith(f"{path}: 4 problem(s):\n")
    for line, code in expected:
        assert f"{path}:{line}: {code}: " in msg
    assert [(i.line, i.code) for i in err.issues] == expected
    assert all(isinstance(i, Issue) for i in err.issues)
    # what is raised is what raise_errors=False returns
    assert err.issues == read_dataset(path, raise_errors=False).issues


def test_raise_errors_message_lists_errors_not_warnings(tmp_path):
    path = write(tmp_path, lines(msgs(U, A, note="x"), "7"))
    with pytest.raises(DataError) as exc:
        read_dataset(path)
    assert [(i.line, i.code, i.level) for i in exc.value.issues] == [
        (1, "unknown_key", "warning"), (2, "not_an_object", "error")]
    assert "unknown_key" not in str(exc.value)
    assert f"{path}:2: not_an_object: " in str(exc.value)


def test_raise_errors_caps_the_message_at_50(tmp_path):
    path = write(tmp_path, lines(*["[]"] * 55))
    with pytest.raises(DataError) as exc:
        read_dataset(path)
    msg = str(exc.value)
    # 55 bad lines + too_few_examples
    assert msg.startswith(f"{path}: 56 problem(s):\n")
    assert f"{path}:50: not_an_object" in msg and f"{path}:51: not_an_object" not in msg
    assert msg.endswith("\n... and 6 more")
    assert len(exc.value.issues) == 56


def test_raise_errors_empty_file(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(DataError, match="empty_file") as exc:
        read_dataset(path)
    assert [(i.line, i.code) for i in exc.value.issues] == [(0, "empty_file")]


def test_no_raise_when_only_warnings(tmp_path):
    path = write(tmp_path, lines(msgs(U, A, id="abc")))
    ds = read_dataset(path)
    assert [(i.code, i.level) for i in ds.issues] == [("unknown_key", "warning")]
    assert ds.errors == []


# --- warnings ---------------------------------------------------------------------------------------


def test_unknown_top_level_key_in_openai_is_a_warning(tmp_path):
    ds = read(tmp_path, msgs(U, A, metadata={"id": 1}) + "\n")
    assert [(i.line, i.code, i.level) for i in ds.issues] == [(1, "unknown_key", "warning")]
    assert "record has unknown key 'metadata'" in ds.issues[0].message
    assert len(ds.conversations) == 1


def test_unknown_top_level_key_did_you_mean(tmp_path):
    ds = read(tmp_path, msgs(U, A, mesages=[]) + "\n")
    assert ds.issues[0].level == "warning"
    assert "(did you mean 'messages'?)" in ds.issues[0].message


def test_unknown_top_level_key_in_sharegpt_is_a_warning(tmp_path):
    ds = read(tmp_path, j({"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}],
                           "id": "x"}) + "\n")
    assert [(i.code, i.level) for i in ds.issues] == [("unknown_key", "warning")]
    assert len(ds.conversations) == 1


def test_system_message_not_first_is_a_warning(tmp_path):
    ds = read(tmp_path, msgs(U, A, S, U, A) + "\n")
    assert [(i.line, i.code, i.level, i.message) for i in ds.issues] == [
        (1, "system_not_first", "warning", "message 2 is a system message after the first turn")]
    assert len(ds.conversations) == 1


def test_system_first_is_fine(tmp_path):
    ds = read(tmp_path, msgs(S, U, A) + "\n")
    assert ds.issues == []


def test_weight_zero_empty_assistant_is_allowed(tmp_path):
    # an empty context turn is not trained on, so it is not an error
    ds = read(tmp_path, msgs(U, {"role": "assistant", "content": "", "weight": 0}, U, A) + "\n")
    assert ds.issues == []


# --- read_dataset arguments ------------------------------------------------------------------------


def test_unknown_format_name_raises_even_without_raise_errors(tmp_path):
    path = write(tmp_path, GOOD_ALPACA + "\n")
    with pytest.raises(DataError, match=r"unknown data format 'alpacca' \(did you mean 'alpaca'\?\)"):
        read_dataset(path, format="alpacca", raise_errors=False)


def test_missing_file_raises(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_dataset(tmp_path / "nope.jsonl", raise_errors=False)


def test_directory_raises(tmp_path):
    with pytest.raises(DataError, match="not a dataset folder"):
        read_dataset(tmp_path, raise_errors=False)


# --- real bugs in the current code (these fail until fixed; see the report) ------------------------


def test_sharegpt_non_string_from_is_an_error_not_a_crash(tmp_path):
    # formats.py `who not in SHAREGPT_ROLES` on a dict raises TypeError for a list/dict 'from'
    ds = read(tmp_path, j({"conversations": [{"from": ["human"], "value": "h"},
                                             {"from": "gpt", "value": "g"}]}) + "\n")
    assert ("unknown_role", 1) in errors(ds)


def test_sharegpt_weight_zero_is_not_silently_trained_on(tmp_path):
    # 'weight' is an allowed key of a sharegpt turn but is dropped: a weight-0 turn gets trained on
    ds = read(tmp_path, j({"conversations": [{"from": "human", "value": "h"},
                                             {"from": "gpt", "value": "ctx", "weight": 0},
                                             {"from": "human", "value": "h2"},
                                             {"from": "gpt", "value": "g"}]}) + "\n")
    if ds.errors:  # rejecting the key is an acceptable fix too
        return
    assert [m.weight for m in ds.conversations[0].messages if m.role == "assistant"][0] == 0


def test_undecodable_file_is_not_reported_as_empty(tmp_path):
    # a Latin-1 file has records; "the file has no records" is wrong and misleading
    ds = read(tmp_path, '{"prompt": "café", "completion": "c"}\n'.encode("latin-1"))
    assert ("invalid_encoding", 1) in errors(ds)
    assert "empty_file" not in [i.code for i in ds.issues]
