"""The four JSONL forms parse into one canonical conversation; chat-template labels hit assistant text."""
from __future__ import annotations

import json

import pytest

from budwood.data.formats import (
    FORMATS,
    Conversation,
    Message,
    data_fingerprint,
    detect_format,
    read_dataset,
)
from budwood.data.template import IGNORE, encode_conversations


def write(tmp_path, records: list, name: str = "data.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return p


def triples(conv: Conversation) -> list[tuple[str, str, int | None]]:
    return [(m.role, m.content, m.weight) for m in conv.messages]


# --- each format ------------------------------------------------------------------------------------


def test_openai_format(tmp_path):
    path = write(tmp_path, [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi", "name": "ann"},
                      {"role": "assistant", "content": "Hello.", "weight": 0},
                      {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4", "weight": 1}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ])
    ds = read_dataset(path)
    assert ds.format == "openai" and ds.issues == [] and ds.path == str(path)
    assert triples(ds.conversations[0]) == [
        ("system", "Be brief.", None), ("user", "Hi", None), ("assistant", "Hello.", 0),
        ("user", "2+2?", None), ("assistant", "4", 1)]
    assert triples(ds.conversations[1]) == [("user", "x", None), ("assistant", "y", None)]
    assert [c.source for c in ds.conversations] == [f"{path}:1", f"{path}:2"]
    assert ds.conversations[0].canonical() == {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "weight": 0}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "weight": 1}]}


def test_openai_content_as_text_parts(tmp_path):
    path = write(tmp_path, [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi"}]}]}])
    ds = read_dataset(path)
    assert triples(ds.conversations[0]) == [("user", "Hello there", None), ("assistant", "Hi", None)]


def test_prompt_completion_format(tmp_path):
    path = write(tmp_path, [{"prompt": "Capital of France?", "completion": "Paris."}])
    ds = read_dataset(path)
    assert ds.format == "prompt_completion"
    assert triples(ds.conversations[0]) == [("user", "Capital of France?", None),
                                            ("assistant", "Paris.", None)]


def test_alpaca_format(tmp_path):
    path = write(tmp_path, [
        {"instruction": "Translate.", "input": "bonjour", "output": "hello", "system": "You translate."},
        {"instruction": "Say hi.", "output": "hi"},
        {"instruction": "Say hi.", "input": "", "output": "hi", "system": ""},
    ])
    ds = read_dataset(path)
    assert ds.format == "alpaca" and ds.issues == []
    assert triples(ds.conversations[0]) == [("system", "You translate.", None),
                                            ("user", "Translate.\n\nbonjour", None),
                                            ("assistant", "hello", None)]
    assert triples(ds.conversations[1]) == [("user", "Say hi.", None), ("assistant", "hi", None)]
    assert triples(ds.conversations[2]) == triples(ds.conversations[1])


def test_sharegpt_format(tmp_path):
    path = write(tmp_path, [
        {"system": "Be kind.", "conversations": [{"from": "human", "value": "Hi"},
                                                 {"from": "gpt", "value": "Hello"},
                                                 {"from": "user", "value": "Again"},
                                                 {"from": "model", "value": "Hello again"}]},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                           {"from": "assistant", "value": "a"}]},
    ])
    ds = read_dataset(path)
    assert ds.format == "sharegpt" and ds.issues == []
    assert triples(ds.conversations[0]) == [
        ("system", "Be kind.", None), ("user", "Hi", None), ("assistant", "Hello", None),
        ("user", "Again", None), ("assistant", "Hello again", None)]
    assert triples(ds.conversations[1]) == [("system", "S", None), ("user", "q", None),
                                            ("assistant", "a", None)]


# --- detection --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("record", "fmt"), [
    ({"messages": []}, "openai"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"completion": "c"}, "prompt_completion"),
    ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"output": "o"}, "alpaca"),
    ({"conversations": []}, "sharegpt"),
    ({"text": "t"}, None),
    ({}, None),
])
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_registered_formats():
    assert set(FORMATS) == {"openai", "prompt_completion", "alpaca", "sharegpt", "openai_preference",
                            "trl_preference"}


@pytest.mark.parametrize(("record", "fmt"), [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "openai"),
    ({"prompt": "q", "completion": "a"}, "prompt_completion"),
    ({"instruction": "q", "output": "a"}, "alpaca"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
])
def test_auto_and_named_format_give_same_canonical_conversation(tmp_path, record, fmt):
    path = write(tmp_path, [record, record])
    auto = read_dataset(path)
    named = read_dataset(path, format=fmt)
    assert auto.format == named.format == fmt
    expected = [("user", "q", None), ("assistant", "a", None)]
    assert [triples(c) for c in auto.conversations] == [expected, expected]
    assert [triples(c) for c in named.conversations] == [expected, expected]
    # all four forms give the same canonical conversation, hence the same fingerprint
    one = Conversation([Message("user", "q"), Message("assistant", "a")])
    assert auto.fingerprint() == data_fingerprint([one, one])


def test_blank_lines_and_crlf_keep_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    rec = json.dumps({"prompt": "p", "completion": "c"})
    path.write_bytes(f"\r\n{rec}\r\n   \r\n{rec}\r\n\r\n".encode())
    ds = read_dataset(path)
    assert ds.issues == []
    assert [c.source for c in ds.conversations] == [f"{path}:2", f"{path}:4"]


def test_unicode_content_roundtrips(tmp_path):
    path = write(tmp_path, [{"prompt": "Grüße 👋", "completion": "日本語\nline2"}])
    ds = read_dataset(path)
    assert triples(ds.conversations[0]) == [("user", "Grüße 👋", None), ("assistant", "日本語\nline2", None)]


# --- fingerprint ------------------------------------------------------------------------------------


CONV = [
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
                  {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]},
]


def test_fingerprint_is_stable(tmp_path):
    a = read_dataset(write(tmp_path, CONV, "a.jsonl")).fingerprint()
    b = read_dataset(write(tmp_path, CONV, "b.jsonl")).fingerprint()  # path is not part of it
    assert a == b == read_dataset(tmp_path / "a.jsonl").fingerprint()
    assert a.startswith("sha256:") and len(a) == len("sha256:") + 64


def test_fingerprint_ignores_json_layout(tmp_path):
    a = read_dataset(write(tmp_path, CONV, "a.jsonl")).fingerprint()
    p = tmp_path / "b.jsonl"
    p.write_text("\n".join(json.dumps(r, indent=None, separators=(",", ":"), sort_keys=True)
                           for r in CONV) + "\n\n\n", encoding="utf-8")
    assert read_dataset(p).fingerprint() == a


def _changed(i, key, value):
    recs = json.loads(json.dumps(CONV))
    recs[1]["messages"][i][key] = value
    return recs


@pytest.mark.parametrize("changed", [
    _changed(1, "content", "a2!"),
    _changed(0, "content", "q2 "),
    _changed(1, "weight", 0),
    [CONV[1], CONV[0]],  # order matters
    CONV[:1],
], ids=["assistant_content", "user_content", "weight", "order", "fewer"])
def test_fingerprint_changes_with_data(tmp_path, changed):
    a = read_dataset(write(tmp_path, CONV, "a.jsonl")).fingerprint()
    b = read_dataset(write(tmp_path, changed, "b.jsonl")).fingerprint()
    assert a != b


# --- chat template and labels -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from budwood.models.load import load_tokenizer

    return load_tokenizer("budwood-tiny")


def conv(*pairs, source="data.jsonl:7") -> Conversation:
    return Conversation([Message(*p) for p in pairs], source)


def labelled_runs(tok, enc) -> list[str]:
    """Decoded text of each maximal run of labelled tokens."""
    runs, cur = [], []
    for i, lab in zip(enc.input_ids, enc.labels, strict=True):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_tokenizer_template_renders_as_expected(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|bos|><|user|>\nHi<|end|>\n<|assistant|>\nYo<|end|>\n"


def test_labels_only_on_assistant_content_and_end_token(tok):
    c = conv(("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello! How can I help?"))
    (enc,) = encode_conversations(tok, [c], max_seq_len=512)
    assert len(enc) == len(enc.input_ids) == len(enc.labels)
    assert enc.source == "data.jsonl:7"
    assert tok.decode(enc.input_ids) == ("<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n"
                                         "<|assistant|>\nHello! How can I help?<|end|>\n")
    assert labelled_runs(tok, enc) == ["Hello! How can I help?<|end|>\n"]
    # everything before the answer, the assistant header included, is masked
    first = next(k for k, lab in enumerate(enc.labels) if lab != IGNORE)
    assert tok.decode(enc.input_ids[:first]).endswith("<|assistant|>\n")
    assert all(lab != IGNORE for lab in enc.labels[first:])
    end_id = tok.convert_tokens_to_ids("<|end|>")
    assert enc.labels[-2] == end_id


def test_multi_turn_labels_both_assistant_turns(tok):
    c = conv(("user", "Hi"), ("assistant", "Hello."), ("user", "How are you?"),
             ("assistant", "Fine, thanks."))
    (enc,) = encode_conversations(tok, [c], max_seq_len=512)
    assert labelled_runs(tok, enc) == ["Hello.<|end|>\n", "Fine, thanks.<|end|>\n"]


def test_weight_zero_turn_gets_no_labels(tok):
    c = conv(("user", "Hi"), ("assistant", "Hello.", 0), ("user", "How are you?"), ("assistant", "Fine.", 1))
    (enc,) = encode_conversations(tok, [c], max_seq_len=512)
    assert labelled_runs(tok, enc) == ["Fine.<|end|>\n"]
    assert "Hello." in tok.decode(enc.input_ids)  # still in the context


def test_weight_zero_last_turn_gets_no_labels(tok):
    c = conv(("user", "Hi"), ("assistant", "Hello.", 1), ("user", "Bye"), ("assistant", "Bye.", 0))
    (enc,) = encode_conversations(tok, [c], max_seq_len=512)
    assert labelled_runs(tok, enc) == ["Hello.<|end|>\n"]


def test_encode_from_file_batch(tok, tmp_path):
    path = write(tmp_path, [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
        {"messages": [{"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]},
    ])
    ds = read_dataset(path)
    encs = encode_conversations(tok, ds.conversations, max_seq_len=512)
    assert [e.source for e in encs] == [f"{path}:1", f"{path}:2"]
    assert [labelled_runs(tok, e) for e in encs] == [["d<|end|>\n"], ["f<|end|>\n"]]


def test_too_long_is_truncated_with_warning(tok):
    long_answer = " ".join(["word"] * 200)
    c = conv(("user", "Tell me a lot."), ("assistant", long_answer), source="/data/train.jsonl:12")
    (full,) = encode_conversations(tok, [c], max_seq_len=4096)
    issues = []
    (enc,) = encode_conversations(tok, [c], max_seq_len=32, issues=issues)
    assert len(full) > 32
    assert len(enc.input_ids) == len(enc.labels) == 32
    assert enc.input_ids == full.input_ids[:32] and enc.labels == full.labels[:32]
    assert any(lab != IGNORE for lab in enc.labels)
    assert [(i.file, i.line, i.code, i.level) for i in issues] == [
        ("/data/train.jsonl", 12, "too_long", "warning")]
    assert issues[0].message == f"{len(full)} tokens, truncated to max_seq_len 32"


def test_too_long_without_issue_list(tok):
    c = conv(("user", "q"), ("assistant", " ".join(["word"] * 100)))
    (enc,) = encode_conversations(tok, [c], max_seq_len=16)
    assert len(enc) == 16


def test_truncation_that_removes_every_label_skips_example(tok):
    c = conv(("user", " ".join(["word"] * 100)), ("assistant", "ok"), source="f.jsonl:3")
    issues = []
    assert encode_conversations(tok, [c], max_seq_len=16, issues=issues) == []
    assert [(i.line, i.code, i.level) for i in issues] == [(3, "too_long", "warning"),
                                                           (3, "no_trainable_tokens", "warning")]


def test_exact_fit_is_not_truncated(tok):
    c = conv(("user", "q"), ("assistant", "a"))
    (full,) = encode_conversations(tok, [c], max_seq_len=4096)
    issues = []
    (enc,) = encode_conversations(tok, [c], max_seq_len=len(full), issues=issues)
    assert issues == [] and enc.input_ids == full.input_ids


# --- real bug in the current code (fails until fixed; see the report) -------------------------------


def test_assistant_first_turn_does_not_label_bos_and_header(tok):
    # template.py: `prefix = ... if i else ""` makes the span of a first-message assistant start at 0,
    # so <|bos|><|assistant|>\n are trained on. The openai format accepts such a record.
    (enc,) = encode_conversations(tok, [conv(("assistant", "Hello"))], max_seq_len=512)
    assert labelled_runs(tok, enc) == ["Hello<|end|>\n"]


def test_a_line_nested_too_deep_is_an_issue_not_a_recursion_error(tmp_path):
    from budwood.data.formats import MAX_JSON_DEPTH

    good = {"messages": [{"role": "user", "content": "[[[[" * 100}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(good) + "\n" + "[" * 45_000 + "\n" + '{"a":' * (MAX_JSON_DEPTH + 1) + "1"
                    + "}" * (MAX_JSON_DEPTH + 1) + "\n")
    ds = read_dataset(path, raise_errors=False)
    assert len(ds.conversations) == 1  # the brackets inside a string do not count
    assert [str(i) for i in ds.errors] == [
        f"{path}:2: too_deep: arrays and objects nested deeper than {MAX_JSON_DEPTH} levels",
        f"{path}:3: too_deep: arrays and objects nested deeper than {MAX_JSON_DEPTH} levels"]


@pytest.mark.parametrize("text, depth", [
    (b"{}", 1), (b'[[1], {"a": [2]}]', 3), (b'"[[[["', 0), (b'{"a": "x\\"[[", "b": [[]]}', 3),
    (b'["a\\\\"]', 1), (b'"unterminated [[[', 0), (b"[" * 1000, 1000), (b"plain", 0)])
def test_json_depth_skips_brackets_inside_strings(text, depth):
    from budwood.data.formats import json_depth

    assert json_depth(text) == depth
