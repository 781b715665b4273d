"""The data validator under random input (hypothesis): whatever a JSONL file holds, read_dataset either reads it or
reports each bad line as an Issue at file:line; it never raises anything but DataError and never recurses out."""
from __future__ import annotations

import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budwood.data.formats import Dataset, read_dataset
from budwood.errors import DataError

ROLES = st.sampled_from(["system", "user", "assistant", "tool", "gpt", "human", "", "ASSISTANT"])
TEXT = st.one_of(st.text(max_size=40), st.none(), st.integers(), st.lists(st.text(max_size=5), max_size=3))
MESSAGE = st.dictionaries(st.sampled_from(["role", "content", "weight", "from", "value", "name", "tool_calls"]),
                          st.one_of(ROLES, TEXT, st.floats(allow_nan=True), st.booleans()), max_size=5)
# records shaped like each accepted form, with every field's type and value drawn at random
RECORD = st.one_of(
    st.fixed_dictionaries({"messages": st.one_of(st.lists(MESSAGE, max_size=5), TEXT)}),
    st.fixed_dictionaries({"prompt": TEXT, "completion": TEXT}),
    st.fixed_dictionaries({"instruction": TEXT, "output": TEXT}, optional={"input": TEXT}),
    st.fixed_dictionaries({"conversations": st.one_of(st.lists(MESSAGE, max_size=5), TEXT)}),
    st.fixed_dictionaries({"input": st.one_of(st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=3)}),
                                              TEXT),
                           "preferred_output": st.one_of(st.lists(MESSAGE, max_size=2), TEXT),
                           "non_preferred_output": st.one_of(st.lists(MESSAGE, max_size=2), TEXT)}),
    st.fixed_dictionaries({"prompt": st.one_of(TEXT, st.lists(MESSAGE, max_size=3)),
                           "chosen": st.one_of(TEXT, st.lists(MESSAGE, max_size=3)),
                           "rejected": st.one_of(TEXT, st.lists(MESSAGE, max_size=3))}),
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
                 lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=3)), max_leaves=20),
)
LINE = st.one_of(RECORD.map(json.dumps), st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
                 st.integers(1, 5000).map(lambda n: "[" * n + "]" * (n % 7)))


def check(tmp_path, lines: list[str]) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    try:
        ds = read_dataset(path, raise_errors=False, min_examples=0)
    except DataError:
        return
    assert isinstance(ds, Dataset)
    n_lines = len(path.read_bytes().splitlines())  # a random line may hold \r or \x0b: lines as the reader splits them
    for issue in ds.issues:  # every problem names its line in this file
        assert issue.file == str(path) and 0 <= issue.line <= n_lines, issue  # 0: the file as a whole
        assert re.fullmatch(r"[a-z_]+", issue.code), issue


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(LINE, min_size=1, max_size=6))
def test_any_jsonl_is_read_or_refused_line_by_line(tmp_path, lines):
    check(tmp_path, lines)


def test_a_line_nested_ten_thousand_deep_is_an_issue_on_its_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n" + "[" * 10_000 + "\n")
    ds = read_dataset(path, raise_errors=False)
    assert [(i.line, i.code) for i in ds.issues if i.level == "error"] == [(2, "too_deep")]
