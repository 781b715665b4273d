"""Data sources beyond JSONL: JSON arrays, CSV, Parquet, `datasets` folders, Hub ids, and field renaming."""
import csv
import json

import pytest

from budwood.data.formats import read_dataset
from budwood.data.sources import FieldMap, is_hub_id
from budwood.errors import DataError
from tests.conftest import chat_rows

ALPACA = [{"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)} for i in range(5)]


def test_json_array_and_data_object_number_records_from_one(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    ds = read_dataset(tmp_path / "a.json")
    assert ds.format == "alpaca" and len(ds.examples) == 5
    assert ds.examples[2].messages[-1].content == "4" and ds.examples[2].source.endswith("a.json:3")
    (tmp_path / "b.json").write_text(json.dumps({"data": ALPACA[:2]}))
    assert len(read_dataset(tmp_path / "b.json").examples) == 2
    (tmp_path / "c.json").write_text(json.dumps({"rows": ALPACA}))
    with pytest.raises(DataError, match="not_an_array"):
        read_dataset(tmp_path / "c.json")


def test_json_named_file_holding_lines_reads_as_jsonl(tmp_path):
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in ALPACA))
    assert len(read_dataset(tmp_path / "lines.json").examples) == 5


def test_csv_rows_with_line_numbers_and_json_cells(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        for row in chat_rows(3, "q{i}", "a{i}"):
            w.writerow([json.dumps(row["messages"])])
        w.writerow([json.dumps([{"role": "user", "content": "only a question"}])])
    ds = read_dataset(path, raise_errors=False)
    assert len(ds.examples) == 3 and ds.examples[1].messages[1].content == "a1"
    assert [(e.line, e.code) for e in ds.errors] == [(5, "no_assistant_message")]  # header is line 1


def test_csv_alpaca_with_a_ragged_row(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("instruction,output\nSay hi,hi\nSay yo,yo,extra\n")
    ds = read_dataset(path, raise_errors=False)
    assert len(ds.examples) == 1 and [(e.line, e.code) for e in ds.errors] == [(3, "csv_columns")]


def test_parquet_and_datasets_folders(tmp_path):
    import datasets

    table = datasets.Dataset.from_list(chat_rows(4, "q{i}", "a{i}"))
    table.to_parquet(str(tmp_path / "f.parquet"))
    ds = read_dataset(tmp_path / "f.parquet")
    assert [c.messages[1].content for c in ds.examples] == ["a0", "a1", "a2", "a3"]
    datasets.DatasetDict({"train": table, "test": table.select(range(1))}).save_to_disk(str(tmp_path / "saved"))
    assert len(read_dataset(tmp_path / "saved").examples) == 4
    assert len(read_dataset(tmp_path / "saved", split="test").examples) == 1
    with pytest.raises(DataError, match="no split 'dev'; it has train, test"):
        read_dataset(tmp_path / "saved", split="dev")
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows(2, "q", "a")))
    assert len(read_dataset(tmp_path / "files").examples) == 2
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_dataset(tmp_path / "bad.parquet")


def test_hub_ids_go_to_the_hub_loader_and_say_so_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("teknium/GPT4-LLM-Cleaned") and not is_hub_id("data/train.jsonl")
    with pytest.raises(DataError, match=r"teknium/GPT4-LLM-Cleaned: could not load this Hub dataset \(split 'train'"):
        read_dataset("teknium/GPT4-LLM-Cleaned")
    with pytest.raises(DataError, match="no such data file"):
        read_dataset("missing/train.jsonl")


def test_field_map_renames_columns_message_keys_and_roles(tmp_path):
    rows = [{"conversation": [{"speaker": "human", "text": f"q{i}"}, {"speaker": "bot", "text": f"a{i}"}]}
            for i in range(2)]
    (tmp_path / "g.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    fields = FieldMap({"messages": "conversation"}, {"role": "speaker", "content": "text"},
                      {"user": ("human",), "assistant": ("bot",)})
    ds = read_dataset(tmp_path / "g.jsonl", "openai", fields=fields)
    assert [(m.role, m.content) for m in ds.examples[1].messages] == [("user", "q1"), ("assistant", "a1")]
    with pytest.raises(DataError, match="unknown_format"):
        read_dataset(tmp_path / "g.jsonl")  # without the map it is nothing budwood knows


def test_sharegpt_preference_pairs_read_as_trl_pairs(tmp_path):
    row = {"conversations": [{"from": "human", "value": "Capital of France?"}],
           "chosen": {"from": "gpt", "value": "Paris."}, "rejected": {"from": "gpt", "value": "Lyon."}}
    (tmp_path / "p.json").write_text(json.dumps([row]))
    fields = FieldMap({"prompt": "conversations"}, {"role": "from", "content": "value"},
                      {"user": ("human",), "assistant": ("gpt",)})
    ds = read_dataset(tmp_path / "p.json", fields=fields)
    assert ds.kind == "preference" and ds.examples[0].chosen[-1].content == "Paris."


def test_hostile_values_are_errors_with_their_line_not_tracebacks(tmp_path):
    good = json.dumps(chat_rows(1, "q", "a")[0])
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join([good, '{"messages": ' + "1" * 5000 + "}",
                               '{"messages": [{"role": "user", "content": "\\ud800"}, '
                               '{"role": "assistant", "content": "a"}]}']))
    ds = read_dataset(path, raise_errors=False)
    assert [(e.line, e.code) for e in ds.errors] == [(2, "invalid_json"), (3, "invalid_unicode")]
    pretty = tmp_path / "p.json"
    pretty.write_text(json.dumps(ALPACA, indent=2)[:-30] + "\n  oops\n]")
    err = read_dataset(pretty, raise_errors=False).errors[0]
    assert err.code == "invalid_json" and err.line == 24  # the line of the damage, not 1
    with pytest.raises(DataError, match="cannot read it"):
        read_dataset(tmp_path / "h.jsonl" / "x.jsonl")


def test_csv_json_cells_decode_only_where_the_format_takes_structure(tmp_path):
    path = tmp_path / "j.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "output"])
        w.writerow(["Give JSON.", '{"name": "x"}'])
    assert read_dataset(path).examples[0].messages[-1].content == '{"name": "x"}'


def test_renames_happen_at_once_not_in_a_chain():
    fields = FieldMap({"instruction": "question", "input": "instruction"})
    assert fields.apply({"question": "Q", "instruction": "I", "output": "O"}) == {
        "output": "O", "instruction": "Q", "input": "I"}
