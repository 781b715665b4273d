"""Several training sources with mixing weights, per-source limits and held-out shares, and the template check."""
import json

import pytest

from budwood.config import load_config
from budwood.errors import ConfigError, DataError
from budwood.models.load import load_tokenizer
from budwood.train.data import prepare_data
from tests.conftest import chat_rows


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("budwood-tiny")


def _config(tmp_path, sources, *extra):
    return load_config(None, [f"data.sources={json.dumps(sources)}", f"output_dir={tmp_path / 'out'}", *extra])


def _answers(prepared, tok):
    return [tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != -100]).strip() for e in prepared.train]


def test_weights_repeat_and_draw_a_seeded_share(tmp_path, tok):
    a = _write(tmp_path / "a.jsonl", chat_rows(4, "qa{i}", "a{i}"))
    b = _write(tmp_path / "b.jsonl", chat_rows(10, "qb{i}", "b{i}"))
    cfg = _config(tmp_path, [{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}])
    prepared = prepare_data(cfg, tok)
    answers = _answers(prepared, tok)
    assert len(answers) == 4 * 2 + 5
    assert sorted(x for x in answers if x.startswith("a")) == sorted([f"a{i}<|end|>" for i in range(4)] * 2)
    drawn = [x for x in answers if x.startswith("b")]
    assert len(set(drawn)) == 5
    assert _answers(prepare_data(cfg, tok), tok) == answers  # seeded: the same draw every time
    srcs = prepared.fingerprints["train"]["sources"]
    assert [(s["weight"], s["examples"]) for s in srcs] == [(2.0, 4), (0.5, 10)]
    assert prepared.fingerprints["train"]["examples"] == 13


def test_one_train_file_is_unchanged_by_sources(tmp_path, tok):
    a = _write(tmp_path / "a.jsonl", chat_rows(6, "q{i}", "a{i}"))
    one = prepare_data(load_config(None, [f"data.train={a}"]), tok)
    same = prepare_data(_config(tmp_path, [{"path": str(a)}]), tok)
    assert one.fingerprints["train"]["fingerprint"] == same.fingerprints["train"]["fingerprint"]
    assert "sources" not in one.fingerprints["train"]


def test_held_out_share_is_taken_per_source_before_mixing(tmp_path, tok):
    a = _write(tmp_path / "a.jsonl", chat_rows(10, "qa{i}", "a{i}"))
    b = _write(tmp_path / "b.jsonl", chat_rows(10, "qb{i}", "b{i}"))
    cfg = _config(tmp_path, [{"path": str(a), "weight": 3}, {"path": str(b)}], "data.validation_split=0.2")
    prepared = prepare_data(cfg, tok)
    train, held = set(_answers(prepared, tok)), {tok.decode([t for t, lab in zip(e.input_ids, e.labels)
                                                             if lab != -100]).strip() for e in prepared.validation}
    assert len(held) == 4 and not train & held  # 2 from each, never also trained on
    assert len(prepared.train) == 8 * 3 + 8


def test_max_examples_and_a_weight_that_leaves_nothing(tmp_path, tok):
    a = _write(tmp_path / "a.jsonl", chat_rows(10, "q{i}", "a{i}"))
    prepared = prepare_data(_config(tmp_path, [{"path": str(a), "max_examples": 3}]), tok)
    assert _answers(prepared, tok) == ["a0<|end|>", "a1<|end|>", "a2<|end|>"]
    with pytest.raises(DataError, match="weight 0.01 of 10 examples leaves none"):
        prepare_data(_config(tmp_path, [{"path": str(a), "weight": 0.01}, {"path": str(a)}]), tok)


def test_train_or_sources_not_both_and_kinds_must_match_the_method(tmp_path, tok):
    a = _write(tmp_path / "a.jsonl", chat_rows(3, "q{i}", "a{i}"))
    with pytest.raises(ConfigError, match="give data.train .* or data.sources .*not both"):
        load_config(None, [f"data.train={a}", f"data.sources=[{{path: {a}}}]"])
    pairs = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "yes", "rejected": "no"}])
    with pytest.raises(DataError, match="p.jsonl: this is preference data"):
        prepare_data(_config(tmp_path, [{"path": str(a)}, {"path": str(pairs)}]), tok)


def test_chat_template_family_is_checked_against_the_tokenizer(tmp_path, tok):
    a = _write(tmp_path / "a.jsonl", chat_rows(3, "q{i}", "a{i}"))
    assert prepare_data(load_config(None, [f"data.train={a}", "data.chat_template=phi_3"]), tok).train
    with pytest.raises(DataError, match="data.chat_template is 'llama3' but .* lacks <\\|start_header_id\\|>; it looks "
                                        "like phi"):
        prepare_data(load_config(None, [f"data.train={a}", "data.chat_template=llama3"]), tok)
    with pytest.raises(ConfigError, match=r"unknown chat template family 'lama3' \(did you mean 'llama3'\?\)"):
        load_config(None, [f"data.train={a}", "data.chat_template=lama3"])
