"""The evaluation data: sets shipped with budwood (with their licences) and the user's own JSONL files.

Every file a suite reads is recorded in the results with its sha256, so two results files say
whether they measured the same thing. Sets marked eval_only in datasets.json (CrowS-Pairs, ParaRel)
must never be trained on; training refuses files from this folder.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from budwood.errors import DataError
from budwood.eval.results import DataRef

DATA_DIR = Path(__file__).parent / "data"


@cache
def catalogue() -> dict:
    return json.loads((DATA_DIR / "datasets.json").read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped(set_name: str, file: str) -> tuple[Path, DataRef]:
    info = catalogue()[set_name]
    path = DATA_DIR / set_name / file
    return path, DataRef(name=info["name"], path=f"budwood:eval/data/{set_name}/{file}", sha256=sha256(path),
                         licence=info["licence"], eval_only=info["eval_only"])


def user_file(path: str | Path, name: str) -> DataRef:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file ({name})")
    return DataRef(name=name, path=str(path.resolve()), sha256=sha256(path))


def is_eval_only(path: str | Path) -> bool:
    """True for a file inside budwood's evaluation data (training refuses these)."""
    try:
        Path(path).resolve().relative_to(DATA_DIR.resolve())
        return True
    except ValueError:
        return False


def read_text(path: Path) -> str:
    data = path.read_bytes()
    return (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8-sig")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(read_text(path), newline="")))


# -- question sets for grounding, reproducibility and counterfactual probes ----------------------------

@dataclass
class Question:
    question: str
    answers: list[str] | None  # acceptable answers, the full reference first; None: see `reference`
    system: str | None = None
    group: str | None = None  # questions of one group ask for the same fact (paraphrases)
    reference: str | None = None  # a free-text reference answer, scored by scoring.matches_reference

    @property
    def answerable(self) -> bool:
        """Short answers or a reference given; neither marks a question the data cannot answer."""
        return bool(self.answers) or self.reference is not None


def read_questions(path: str | Path) -> list[Question]:
    """A grounding JSONL: {"question", "answer": str | null, "answers"?: [str], "reference"?: str, "system"?,
    "fact"?}. `answer`/`answers` are short answers a right reply must contain; `reference` is instead a whole
    reference answer (tenant data: scoring.matches_reference). Neither (or an answer of null) marks an
    unanswerable question."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file (grounding questions)")
    out = [_question(row, f"{path}:{n}") for n, row in enumerate(read_jsonl(path), 1)]
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def _question(row: dict, where: str) -> Question:
    q = row.get("question")
    if not isinstance(q, str) or not q.strip():
        raise DataError(f"{where}: field 'question' must be a non-empty string")
    answer, answers, reference = row.get("answer"), row.get("answers"), row.get("reference")
    if answer is not None and not isinstance(answer, str):
        raise DataError(f"{where}: field 'answer' must be a string, or null for an unanswerable question")
    if answers is not None and (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
        raise DataError(f"{where}: field 'answers' must be a list of strings")
    if answer is None and answers:
        raise DataError(f"{where}: 'answers' given but 'answer' is null (null marks an unanswerable question)")
    if reference is not None and (not isinstance(reference, str) or not reference.strip()):
        raise DataError(f"{where}: field 'reference' must be a non-empty string (a reference answer)")
    if reference is not None and answer is not None:
        raise DataError(f"{where}: give 'answer' (short answers a reply must contain) or 'reference' (a whole "
                        "reference answer), not both")
    for key in ("system", "fact"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise DataError(f"{where}: field {key!r} must be a string")
    accepted = None if answer is None else [answer, *(answers or [])]
    return Question(q, accepted, row.get("system"), row.get("fact"), reference)


def write_questions(path: str | Path, questions: list[Question]) -> Path:
    """The grounding JSONL that read_questions reads back to the same questions (`grounding.data`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for q in questions:
        row: dict = {"question": q.question, "answer": q.answers[0] if q.answers else None}
        if q.answers and len(q.answers) > 1:
            row["answers"] = q.answers[1:]
        row.update({k: v for k, v in (("reference", q.reference), ("system", q.system), ("fact", q.group))
                    if v is not None})
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(path)
    return path


def company_questions(seed: int = 0) -> tuple[list[Question], DataRef]:
    """The demo's company (data/company.py): held-out phrasings of every fact and unanswerable questions."""
    from budwood.data.company import company_facts

    name, facts, unanswerable = company_facts(seed)
    system = f"You answer questions about {name} using only its facts."
    qs = [Question(q, [f.answer, f.key], system, f.id) for f in facts for q in f.questions[3:]]
    qs += [Question(q, None, system, None) for q in unanswerable]
    digest = hashlib.sha256(json.dumps([q.__dict__ for q in qs], sort_keys=True).encode()).hexdigest()
    return qs, DataRef(name=f"company facts (seed {seed})", path=f"budwood:data/company.py#seed={seed}",
                       sha256=digest)
