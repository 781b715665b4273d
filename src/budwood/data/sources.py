"""Where training records come from, as (line, object) pairs for the format parsers: JSONL, JSON, CSV and
Parquet files, a `datasets` folder (save_to_disk, or a folder of data files) and Hub dataset ids.

JSON, JSONL and CSV are read here rather than through `datasets` so that every problem keeps its file and
line (a JSON array's items are numbered from 1 instead); Parquet, folders and Hub ids go through
`datasets`, whose loaders are the ones practitioners already trust, and their rows are numbered from 1.
A source may rename fields (`columns`), message keys (`message_fields`) and role names (`roles`), so data
laid out as Axolotl's chat_template or LLaMA-Factory's dataset_info.json describe it reads without
rewriting the file.
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from budwood.errors import DataError

MAX_JSON_DEPTH = 64  # a record nested deeper is refused before json.loads recurses into it
MAX_WHOLE_FILE_BYTES = 1 << 30  # a JSON array is parsed whole: above this, use JSONL
MAX_CSV_FIELD_CHARS = 16 << 20
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

# a JSON string, escapes included; an unterminated one runs to the end, so every match attempt succeeds (linear)
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\[\s\S][^"\\]*)*(?:"|\\?\Z)')
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(text: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text (brackets inside strings skipped), found by a
    linear scan without parsing: json.loads and the code that walks its result recurse once per level."""
    if b"[" not in text and b"{" not in text:
        return 0
    import numpy as np

    steps = _JSON_STRING.sub(b"", text).translate(_BRACKET_STEPS, _NOT_BRACKETS)  # +1 per opener, -1 per closer
    return int(np.frombuffer(steps, np.int8).cumsum(dtype=np.int64).max(initial=0))


@dataclass
class RawRecord:
    """One record as read: its line (or row or item number) and the object, or why there is none."""

    line: int
    obj: object = None
    error: tuple[str, str] | None = None  # (code, message)


@dataclass(frozen=True)
class FieldMap:
    """Renamings applied to each record before it is parsed. `columns`: budwood's field -> the record's;
    `message_fields`: the format's message key (role/content, or from/value) -> the record's; `roles`: the
    format's role name -> the record's names for it."""

    columns: dict[str, str] = field(default_factory=dict)
    message_fields: dict[str, str] = field(default_factory=dict)
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.columns or self.message_fields or self.roles)

    def apply(self, obj: dict) -> dict:
        out = _renamed(obj, self.columns)
        for key in ("chosen", "rejected"):  # LLaMA-Factory's pairs hold one answer message each
            if isinstance(out.get(key), dict):
                out[key] = [out[key]]
        if not (self.message_fields or self.roles):
            return out
        role_of = {name: ours for ours, names in self.roles.items() for name in names}
        for key in ("messages", "conversations", "chosen", "rejected", "prompt"):
            turns = out.get(key)
            if isinstance(turns, list):
                out[key] = [self._message(t, role_of) for t in turns]
        return out

    def _message(self, turn, role_of: dict[str, str]):
        if not isinstance(turn, dict):
            return turn
        turn = _renamed(turn, self.message_fields)
        for key in ("role", "from"):
            if isinstance(turn.get(key), str) and turn[key] in role_of:
                turn[key] = role_of[turn[key]]
        return turn


def _renamed(obj: dict, renames: dict[str, str]) -> dict:
    """All renames at once (ours <- theirs), so {instruction: question, input: instruction} swaps rather than
    chains; a key renamed onto replaces the one of that name."""
    moved = {ours: obj[theirs] for ours, theirs in renames.items() if theirs in obj}
    out = {k: v for k, v in obj.items() if k not in renames.values()}
    out.update(moved)
    return out


# CSV columns whose cells may hold JSON, and which decoded shapes each takes (others stay text)
STRUCTURED = {"messages": (list,), "conversations": (list,), "tools": (list,), "chosen": (list, dict, str),
              "rejected": (list, dict, str), "prompt": (list,), "completion": (list,), "input": (dict,)}


def is_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and not Path(path).exists() and Path(path).suffix.lower() not in SUFFIXES


def read_records(path: str | Path, *, split: str = "train", subset: str | None = None,
                 fields: FieldMap | None = None) -> Iterator[RawRecord]:
    """Every record of a source, in order. Raises DataError only for a source that cannot be opened at all;
    a bad record is yielded with its error so that all of a file's problems are reported at once."""
    text = str(path)
    p = Path(path)
    csv_cells = False
    if p.is_dir():
        rows = _folder_rows(p, split)
    elif p.exists() or not is_hub_id(text):
        rows = _file_rows(p)
        csv_cells = SUFFIXES.get(p.suffix.lower()) == "csv"
    else:
        rows = _hub_rows(text, split, subset)
    for rec in rows:
        if fields and isinstance(rec.obj, dict):
            rec.obj = fields.apply(rec.obj)
        if csv_cells and isinstance(rec.obj, dict):
            rec.obj = {k: _cell(v, STRUCTURED[k]) if k in STRUCTURED else v for k, v in rec.obj.items()}
        yield rec


def _file_rows(path: Path) -> Iterator[RawRecord]:
    kind = SUFFIXES.get(path.suffix.lower(), "jsonl")  # any other name is read as JSONL, as before
    try:
        if kind == "parquet":
            yield from _parquet_rows(path)
            return
        raw = path.read_bytes() if kind != "json" or path.stat().st_size <= MAX_WHOLE_FILE_BYTES else None
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a data file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e.__class__.__name__})") from None
    if raw is None:
        raise DataError(f"{path}: a JSON file over {MAX_WHOLE_FILE_BYTES >> 20} MiB is parsed whole; write it as "
                        "JSONL (one record per line) instead")
    yield from {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows}[kind](raw)


def _decoded(raw: bytes, line: int) -> tuple[str | None, RawRecord | None]:
    try:
        return raw.decode("utf-8-sig" if line == 1 else "utf-8"), None
    except UnicodeDecodeError as e:
        return None, RawRecord(line, error=("invalid_encoding", f"not UTF-8 at byte {e.start + 1}"))


def _parsed(line_bytes: bytes, line: int) -> RawRecord:
    text, bad = _decoded(line_bytes, line)
    if bad:
        return bad
    if json_depth(line_bytes) > MAX_JSON_DEPTH:
        return RawRecord(line, error=("too_deep", f"arrays and objects nested deeper than {MAX_JSON_DEPTH} levels"))
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return RawRecord(line + e.lineno - 1, error=("invalid_json", f"column {e.colno}: {e.msg}"))
    except ValueError as e:  # an integer of over 4,300 digits
        return RawRecord(line, error=("invalid_json", str(e)[:200]))
    if b"\\u" in line_bytes:
        try:
            json.dumps(obj, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            return RawRecord(line, error=("invalid_unicode", "a lone UTF-16 surrogate escape (\\ud800-\\udfff) is not "
                                          "text"))
    return RawRecord(line, obj)


def _jsonl_rows(raw: bytes) -> Iterator[RawRecord]:
    for lineno, line_bytes in enumerate(raw.splitlines(), start=1):
        if line_bytes.strip():
            yield _parsed(line_bytes, lineno)


def _json_rows(raw: bytes) -> Iterator[RawRecord]:
    """A JSON array of records (Alpaca's and LLaMA-Factory's files), or an object holding one under "data";
    records are numbered from 1 in place of lines. A file holding one JSON object per line is JSONL."""
    whole = _parsed(raw, 1)
    if whole.error and "Extra data" in whole.error[1] and raw.lstrip()[:1] == b"{":
        yield from _jsonl_rows(raw)
        return
    if whole.error:
        yield whole
        return
    items = whole.obj.get("data") if isinstance(whole.obj, dict) else whole.obj
    if not isinstance(items, list):
        yield RawRecord(1, error=("not_an_array", "a .json data file holds an array of records (or "
                                  "{\"data\": [...]}); one object per line is JSONL"))
        return
    for i, item in enumerate(items, start=1):
        yield RawRecord(i, item)


def _cell(value, shapes: tuple[type, ...]):
    """CSV cells are text; one in a structured field (messages, conversations, tools, a pair's answers, a
    conversational prompt, OpenAI's preference input) holding JSON of the shape that field takes is that
    value. Anything else stays text, so an Alpaca answer that is JSON is trained as written."""
    if not isinstance(value, str):
        return value
    stripped = value.strip()
    if stripped[:1] in ("[", "{") and json_depth(stripped.encode()) <= MAX_JSON_DEPTH:
        try:
            decoded = json.loads(stripped)
        except ValueError:
            return value
        if isinstance(decoded, shapes):
            return decoded
    return value


def _csv_rows(raw: bytes) -> Iterator[RawRecord]:
    text, bad = _decoded(raw, 1)
    if bad:
        yield bad
        return
    csv.field_size_limit(MAX_CSV_FIELD_CHARS)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        return
    try:
        for row in reader:
            if None in row:
                yield RawRecord(reader.line_num, error=("csv_columns", f"{len(reader.fieldnames) + len(row[None])} "
                                                        f"cells for {len(reader.fieldnames)} header columns"))
                continue
            cells = {k: v for k, v in row.items() if v is not None and v != ""}
            yield RawRecord(reader.line_num, cells)
    except csv.Error as e:
        yield RawRecord(reader.line_num, error=("invalid_csv", str(e)))


def _rows_of(table) -> Iterator[RawRecord]:
    for i, row in enumerate(table, start=1):
        yield RawRecord(i, {k: v for k, v in row.items() if v is not None})


def _parquet_rows(path: Path) -> Iterator[RawRecord]:
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    import datasets

    try:
        table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as e:  # noqa: BLE001  (pyarrow raises many kinds for a damaged file)
        raise DataError(f"{path}: not a readable Parquet file ({e.__class__.__name__}: {str(e)[:200]})") from None
    yield from _rows_of(table)


def _folder_rows(path: Path, split: str) -> Iterator[RawRecord]:
    """A folder written by `datasets`' save_to_disk, or a folder of data files `datasets.load_dataset` reads."""
    import datasets

    try:
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
        else:
            loaded = datasets.load_dataset(str(path), keep_in_memory=True)
    except Exception as e:  # noqa: BLE001  (datasets raises many kinds for a folder it cannot read)
        raise DataError(f"{path}: not a dataset folder `datasets` can read ({e.__class__.__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from None
    yield from _rows_of(_split_of(loaded, split, str(path)))


def _hub_rows(dataset_id: str, split: str, subset: str | None) -> Iterator[RawRecord]:
    """A Hub dataset id through `datasets`' own loader (its cache, token and HF_DATASETS_OFFLINE apply)."""
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id, subset, split=split)
    except Exception as e:  # noqa: BLE001  (network, auth and missing-split errors all mean: cannot read it)
        raise DataError(f"{dataset_id}: could not load this Hub dataset (split {split!r}"
                        f"{f', subset {subset!r}' if subset else ''}): {e.__class__.__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:300]}") from None
    yield from _rows_of(loaded)


def _split_of(loaded, split: str, where: str):
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{where}: no split {split!r}; it has {', '.join(loaded)}")
        return loaded[split]
    return loaded
