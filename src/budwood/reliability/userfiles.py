"""The recipes' own input files (a user's unanswerable questions, a user's swap list), read line by line with
errors that name the file, the line and the config key that pointed at it."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from budwood.data.formats import Issue
from budwood.errors import DataError


def read_lines(path: Path, param: str, check: Callable[[Any, Issue], Any]) -> list:
    """Each non-blank line's JSON through `check(value, issue)`, which returns the parsed value or None after
    filling in the issue's code and message; every problem is reported at once, as data files are."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise data_error(f"{param}: {path}: no such file", param)
    out, problems = [], []
    for lineno, line in _lines(path, param):
        issue = Issue(str(path), lineno, "", "")
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Issue(str(path), lineno, "invalid_json", f"column {e.colno}: {e.msg}"))
            continue
        parsed = check(value, issue)
        if parsed is None:
            problems.append(issue)
        else:
            out.append(parsed)
    if problems:
        shown = "\n".join(map(str, problems[:50]))
        raise data_error(f"{param}: {path}: {len(problems)} problem(s):\n{shown}", param, problems)
    if not out:
        raise data_error(f"{param}: {path}: the file has no lines", param)
    return out


def _lines(path: Path, param: str) -> Iterator[tuple[int, str]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise data_error(f"{param}: {path}: not UTF-8 at byte {e.start + 1}", param) from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield lineno, line


def data_error(message: str, param: str, issues: list | None = None) -> DataError:
    """A DataError that names the config key it is about (DataError takes no `param` of its own)."""
    error = DataError(message, issues)
    error.param = param
    return error


def refuse(issue: Issue, code: str, message: str) -> None:
    issue.code, issue.message = code, message
