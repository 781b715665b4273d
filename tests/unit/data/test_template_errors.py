"""Templates that reject an example (Gemma-style 'no system role') give one issue per example."""
import json
import shutil

import pytest

from budwood.data.formats import read_dataset
from budwood.data.template import encode_conversations
from budwood.models.load import TINY_DIR, load_tokenizer


@pytest.fixture(scope="module")
def strict_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("strict")
    for f in TINY_DIR.iterdir():
        shutil.copy(f, folder / f.name)
    template = (folder / "chat_template.jinja").read_text()
    strict = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
              "{% endif %}" + template)
    (folder / "chat_template.jinja").write_text(strict)
    return load_tokenizer(str(folder))


def test_each_rejected_example_is_an_error_issue_and_the_rest_encode(tmp_path, strict_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "system", "content": "s2"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "b"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = read_dataset(path)
    issues = []
    encoded = encode_conversations(strict_tokenizer, ds.conversations, 64, issues)
    assert len(encoded) == 1
    assert [(i.line, i.code, i.level) for i in issues] == [(2, "template_error", "error"),
                                                           (3, "template_error", "error")]
    assert "System role not supported" in issues[0].message

