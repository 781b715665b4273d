"""Errors meant for a person: each names the file, line, field or id that is wrong."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class BudwoodError(Exception):
    """Bad input or a state the user can fix; the CLI prints the message without a traceback."""


class ConfigError(BudwoodError):
    pass


class DataError(BudwoodError):
    """A data file has problems; `issues` holds every one of them, not just the first."""

    def __init__(self, message: str, issues: list | None = None):
        super().__init__(message)
        self.issues = issues or []


class ModelError(BudwoodError):
    pass


class TrainingError(BudwoodError):
    pass


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close choice exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
