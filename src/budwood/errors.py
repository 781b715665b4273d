"""Errors meant for a person: each names the file, line, field or id that is wrong.

Domain code raises these and knows nothing of HTTP. Each error has a `kind` (what went wrong, in
words a caller can act on) and may carry a machine-readable `code` and the `param` it is about; each
surface says it its own way in one place: the HTTP apps map `kind` to a status and OpenAI's error
object (serve/errors.py), the CLI prints the message and exits 2 (cli/boundary.py).
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from enum import StrEnum


class ErrorKind(StrEnum):
    """What kind of refusal an error is; the HTTP status each maps to is in serve/errors.py."""

    INVALID = "invalid"  # the request or input is wrong (400)
    UNAUTHENTICATED = "unauthenticated"  # no valid key (401)
    FORBIDDEN = "forbidden"  # a known caller may not do this (403)
    NOT_FOUND = "not_found"  # the thing named does not exist, or is not visible to the caller (404)
    CONFLICT = "conflict"  # the state forbids it: a taken version, a reused idempotency key (409)
    TOO_LARGE = "too_large"  # a body or file over a limit (413)
    LIMIT = "limit"  # a rate or concurrency limit: wait and retry (429)
    QUOTA = "quota"  # a quota used up: free something or ask for more (429, OpenAI's insufficient_quota)
    UNAVAILABLE = "unavailable"  # try again later: a full queue, a server shutting down (503)
    CANCELLED = "cancelled"  # the caller went away (499)
    INTERNAL = "internal"  # ours to fix, not the caller's: a crashed engine step (500)


class BudwoodError(Exception):
    """Bad input or a state the user can fix; the CLI prints the message without a traceback.

    `code` is a stable machine-readable word (OpenAI's `error.code`); `param` names the request field or
    config key concerned. Subclasses set `kind`; a raise site may override it for one error."""

    kind: ErrorKind = ErrorKind.INVALID
    code: str | None = None
    param: str | None = None

    def __init__(self, message: str = "", *, code: str | None = None, param: str | None = None,
                 kind: ErrorKind | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if param is not None:
            self.param = param
        if kind is not None:
            self.kind = kind


class NotFoundError(BudwoodError):
    kind = ErrorKind.NOT_FOUND


class ConflictError(BudwoodError):
    kind = ErrorKind.CONFLICT


class ForbiddenError(BudwoodError):
    kind = ErrorKind.FORBIDDEN


class LimitExceeded(BudwoodError):
    """A quota or a concurrency limit; TOO_LARGE for a size limit on one body or file."""

    kind = ErrorKind.LIMIT


class Unavailable(BudwoodError):
    kind = ErrorKind.UNAVAILABLE


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


def require_extra(extra: str, what: str, *modules: str) -> None:
    """Refuse by name when an optional extra is not installed (the core install trains, evaluates and serves;
    the service, PostgreSQL, merge search, trackers and quantisation are extras)."""
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except (ValueError, ImportError):  # set to None in sys.modules: blocked, as good as absent
            return True

    missing = [m for m in modules if absent(m)]
    if missing:
        raise BudwoodError(f"{what} needs {', '.join(missing)}, which the core install leaves out: "
                           f"pip install 'budwood[{extra}]'")
