"""Read JSONL training data into one canonical conversation (SFT) or preference pair (DPO).

Forms (registered by name, auto-detected from a record's keys):
  openai             {"messages": [{"role", "content", "weight"?}]}  (OpenAI fine-tuning format)
  prompt_completion  {"prompt", "completion"}
  alpaca             {"instruction", "input"?, "output", "system"?}
  sharegpt           {"conversations": [{"from", "value"}], "system"?}
preference pairs (a Dataset of kind "preference"):
  openai_preference  {"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}
                     (OpenAI's DPO format)
  trl_preference     {"prompt"?, "chosen", "rejected"}: TRL's, plain text (strings: the prompt is a user
                     turn, the answers assistant turns) or conversational (lists of messages); without
                     "prompt", the answers are whole conversations and their common first turns are the
                     prompt (TRL's implicit prompt)

Every problem of a file is collected as an Issue (`file:line: code: message`) in one pass, so a
user fixes a file once instead of once per error, as OpenAI's fine-tuning validator does.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from budwood.errors import DataError, did_you_mean

ROLES = ("system", "user", "assistant")
MAX_JSON_DEPTH = 64  # a record nested deeper is refused before json.loads recurses into it

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
class Message:
    role: str
    content: str
    weight: int | None = None  # assistant only: 0 = context, not trained on


@dataclass
class Conversation:
    messages: list[Message]
    source: str = ""  # file:line it came from

    def canonical(self) -> dict:
        return {"messages": [{k: v for k, v in asdict(m).items() if v is not None} for m in self.messages]}


@dataclass
class PreferencePair:
    """A prompt (the turns before the answer) and two answers to it, the preferred one first."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    source: str = ""  # file:line it came from

    def canonical(self) -> dict:
        turns = lambda ms: [{k: v for k, v in asdict(m).items() if v is not None} for m in ms]  # noqa: E731
        return {"prompt": turns(self.prompt), "chosen": turns(self.chosen), "rejected": turns(self.rejected)}

    def conversations(self) -> tuple[Conversation, Conversation]:
        """The prompt followed by each answer; only the answer's assistant turns are trained on."""
        context = [Message(m.role, m.content, 0 if m.role == "assistant" else None) for m in self.prompt]
        return Conversation(context + self.chosen, self.source), Conversation(context + self.rejected, self.source)


Example = Conversation | PreferencePair


@dataclass
class Issue:
    file: str
    line: int
    code: str
    message: str
    level: str = "error"  # or "warning"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.code}: {self.message}"

    @classmethod
    def at(cls, source: str, code: str, message: str, level: str = "error") -> Issue:
        """An issue about the record a conversation came from (its source is 'file:line')."""
        file, _, line = source.rpartition(":")
        return cls(file, int(line or 0), code, message, level)


@dataclass
class Dataset:
    path: str
    format: str
    conversations: list[Conversation] = field(default_factory=list)  # kind "sft"
    issues: list[Issue] = field(default_factory=list)
    pairs: list[PreferencePair] = field(default_factory=list)  # kind "preference"

    @property
    def kind(self) -> str:
        """"sft" (conversations) or "preference" (pairs): what a run of training.method sft or dpo needs."""
        return "preference" if self.format in PREFERENCE_FORMATS else "sft"

    @property
    def examples(self) -> list[Example]:
        return list(self.pairs) if self.kind == "preference" else list(self.conversations)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "error"]

    def fingerprint(self) -> str:
        return data_fingerprint(self.examples)


def data_fingerprint(examples: list[Conversation] | list[PreferencePair]) -> str:
    h = hashlib.sha256()
    for c in examples:
        h.update(json.dumps(c.canonical(), sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return "sha256:" + h.hexdigest()


class _Record:
    """One JSON line being parsed; collects its issues."""

    def __init__(self, file: str, line: int, issues: list[Issue]):
        self.file, self.line, self.issues = file, line, issues
        self.failed = False

    def error(self, code: str, message: str) -> None:
        self.failed = True
        self.issues.append(Issue(self.file, self.line, code, message))

    def warn(self, code: str, message: str) -> None:
        self.issues.append(Issue(self.file, self.line, code, message, "warning"))

    def text(self, obj: dict, key: str, where: str, required: bool = True) -> str | None:
        if key not in obj or obj[key] is None:
            if required:
                self.error("missing_field" if where == "record" else "missing_content",
                           f"{where} has no '{key}'")
            return None
        value = obj[key]
        if not isinstance(value, str):
            self.error("invalid_type", f"{where} '{key}' must be a string, got {type(value).__name__}")
            return None
        return value

    def unknown_keys(self, obj: dict, allowed: tuple[str, ...], where: str, level: str = "error") -> None:
        for key in obj:
            if key not in allowed:
                msg = f"{where} has unknown key '{key}'{did_you_mean(key, allowed)}; expected {', '.join(allowed)}"
                (self.error if level == "error" else self.warn)("unknown_key", msg)


Parser = Callable[[dict, _Record], list[Message] | None]
FORMATS: dict[str, Parser] = {}
DETECT: dict[str, tuple[str, ...]] = {}  # format -> keys any of which identifies it


def register_format(name: str, identifying_keys: tuple[str, ...]):
    def deco(fn: Parser) -> Parser:
        FORMATS[name] = fn
        DETECT[name] = identifying_keys
        return fn
    return deco


def _content(raw, rec: _Record, where: str) -> str | None:
    """OpenAI allows a string or a list of text parts."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list) and all(isinstance(p, dict) for p in raw):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in raw):
            return "".join(p["text"] for p in raw)
        rec.error("invalid_content", f"{where} content parts must all be {{'type': 'text', 'text': str}}")
        return None
    rec.error("invalid_content", f"{where} content must be a string or a list of text parts, "
                                 f"got {type(raw).__name__}")
    return None


def _turn_list(obj: dict, key: str, rec: _Record) -> list | None:
    """The record's non-empty list of turns, or None after reporting why not."""
    turns = obj.get(key)
    if turns is None:
        rec.error("missing_messages", f"record has no '{key}' list")
    elif not isinstance(turns, list):
        rec.error("messages_not_list", f"'{key}' must be a list, got {type(turns).__name__}")
    elif not turns:
        rec.error("empty_messages", f"'{key}' is empty")
    else:
        return turns
    return None


@register_format("openai", ("messages",))
def parse_openai(obj: dict, rec: _Record) -> list[Message] | None:
    rec.unknown_keys(obj, ("messages",), "record", level="warning")
    msgs = _turn_list(obj, "messages", rec)
    return None if msgs is None else _openai_messages(msgs, rec, "messages")


def _openai_messages(msgs: list, rec: _Record, name: str) -> list[Message]:
    out = []
    for i, m in enumerate(msgs):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            rec.error("message_not_object", f"{where} must be an object, got {type(m).__name__}")
            continue
        for key in ("tool_calls", "function_call", "tool_call_id"):
            if key in m:
                rec.error("unsupported_key", f"{where} has '{key}': tool calls are not supported yet")
        rec.unknown_keys({k: v for k, v in m.items() if k not in ("tool_calls", "function_call",
                                                                   "tool_call_id")},
                         ("role", "content", "weight", "name"), where)
        role = m.get("role")
        if role is None:
            rec.error("missing_role", f"{where} has no 'role'")
            continue
        if role not in ROLES:
            rec.error("unknown_role", f"{where} role {role!r} is not one of {', '.join(ROLES)}"
                      f"{did_you_mean(str(role), ROLES)}")
            continue
        if m.get("content") is None:
            rec.error("missing_content", f"{where} ({role}) has no 'content'")
            continue
        content = _content(m["content"], rec, where)
        if content is None:
            continue
        out.append(Message(role, content, _weight(m, role, rec, where)))
    return out


def _weight(message: dict, role: str, rec: _Record, where: str) -> int | None:
    weight = message.get("weight")
    if weight is None:
        return None
    if role != "assistant":
        rec.error("invalid_weight", f"{where} 'weight' is only allowed on assistant messages")
        return None
    if weight not in (0, 1) or isinstance(weight, bool):
        rec.error("invalid_weight", f"{where} 'weight' must be 0 or 1, got {weight!r}")
        return None
    return int(weight)


@register_format("prompt_completion", ("prompt", "completion"))
def parse_prompt_completion(obj: dict, rec: _Record) -> list[Message] | None:
    rec.unknown_keys(obj, ("prompt", "completion"), "record")
    prompt = rec.text(obj, "prompt", "record")
    completion = rec.text(obj, "completion", "record")
    if prompt is None or completion is None:
        return None
    return [Message("user", prompt), Message("assistant", completion)]


@register_format("alpaca", ("instruction", "output"))
def parse_alpaca(obj: dict, rec: _Record) -> list[Message] | None:
    rec.unknown_keys(obj, ("instruction", "input", "output", "system"), "record")
    instruction = rec.text(obj, "instruction", "record")
    extra = rec.text(obj, "input", "record", required=False)
    output = rec.text(obj, "output", "record")
    system = rec.text(obj, "system", "record", required=False)
    if instruction is None or output is None:
        return None
    user = instruction + (f"\n\n{extra}" if extra else "")
    return ([Message("system", system)] if system else []) + [Message("user", user), Message("assistant", output)]


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}


@register_format("sharegpt", ("conversations",))
def parse_sharegpt(obj: dict, rec: _Record) -> list[Message] | None:
    rec.unknown_keys(obj, ("conversations", "system"), "record", level="warning")
    turns = _turn_list(obj, "conversations", rec)
    if turns is None:
        return None
    system = rec.text(obj, "system", "record", required=False)
    out = [Message("system", system)] if system else []
    for i, t in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(t, dict):
            rec.error("message_not_object", f"{where} must be an object, got {type(t).__name__}")
            continue
        rec.unknown_keys(t, ("from", "value", "weight"), where)
        who = t.get("from")
        if who is None:
            rec.error("missing_role", f"{where} has no 'from'")
            continue
        if not isinstance(who, str) or who not in SHAREGPT_ROLES:
            rec.error("unknown_role", f"{where} 'from' {who!r} is not one of {', '.join(SHAREGPT_ROLES)}"
                      f"{did_you_mean(str(who), SHAREGPT_ROLES)}")
            continue
        value = rec.text(t, "value", where)
        weight = _weight(t, SHAREGPT_ROLES[who], rec, where)
        if value is not None:
            out.append(Message(SHAREGPT_ROLES[who], value, weight))
    return out


PairParser = Callable[[dict, _Record], PreferencePair | None]
PREFERENCE_FORMATS: dict[str, PairParser] = {}


def register_preference_format(name: str, identifying_keys: tuple[str, ...]):
    """A preference format is detected before the SFT forms: TRL's {"prompt", "chosen", "rejected"} also
    has prompt_completion's "prompt"."""
    def deco(fn: PairParser) -> PairParser:
        PREFERENCE_FORMATS[name] = fn
        FORMATS[name] = fn  # type: ignore[assignment]  # one namespace of names for data.format
        DETECT[name] = identifying_keys
        return fn
    return deco


def _answer(raw, rec: _Record, where: str) -> list[Message] | None:
    """A preference answer: assistant turns (a list of messages, as OpenAI and TRL's conversational form give
    it), or a string (TRL's plain-text form)."""
    if isinstance(raw, str):
        return [Message("assistant", raw)]
    if not isinstance(raw, list) or not raw:
        rec.error("invalid_output", f"'{where}' must be a non-empty list of assistant messages or a string")
        return None
    turns = _openai_messages(raw, rec, where)
    if len(turns) != len(raw):
        return None
    if any(m.role != "assistant" for m in turns):
        rec.error("invalid_output", f"'{where}' must hold assistant messages only")
        return None
    if any(m.weight is not None for m in turns):
        rec.error("invalid_weight", f"'{where}': 'weight' is for SFT data; every answer turn is compared")
        return None
    if not any(m.content.strip() for m in turns):
        rec.error("empty_content", f"'{where}' is empty")
        return None
    return turns


def _pair(prompt: list[Message], chosen: list[Message], rejected: list[Message], rec: _Record
          ) -> PreferencePair | None:
    if not prompt:
        rec.error("empty_prompt", "the pair has no prompt: no turn comes before the two answers")
        return None
    if prompt[-1].role == "assistant":
        rec.error("prompt_ends_with_assistant", "the prompt's last turn is the assistant's; the two answers must "
                  "answer a user (or system) turn")
        return None
    if [asdict(m) for m in chosen] == [asdict(m) for m in rejected]:
        rec.warn("identical_answers", "the preferred and non-preferred answers are the same: the pair teaches "
                 "nothing")
    return PreferencePair(prompt, chosen, rejected, f"{rec.file}:{rec.line}")


@register_preference_format("openai_preference", ("preferred_output", "non_preferred_output"))
def parse_openai_preference(obj: dict, rec: _Record) -> PreferencePair | None:
    rec.unknown_keys(obj, ("input", "preferred_output", "non_preferred_output"), "record")
    source = obj.get("input")
    if not isinstance(source, dict):
        rec.error("missing_input" if source is None else "invalid_input",
                  "record needs 'input': {\"messages\": [...]}")
        return None
    for key in ("tools", "parallel_tool_calls"):
        if key in source:
            rec.error("unsupported_key", f"input has '{key}': tool calls are not supported yet")
    rec.unknown_keys({k: v for k, v in source.items() if k not in ("tools", "parallel_tool_calls")},
                     ("messages",), "input")
    msgs = _turn_list(source, "messages", rec)
    prompt = None if msgs is None else _openai_messages(msgs, rec, "input.messages")
    chosen = _answer(obj.get("preferred_output"), rec, "preferred_output")
    rejected = _answer(obj.get("non_preferred_output"), rec, "non_preferred_output")
    if prompt is None or chosen is None or rejected is None or rec.failed:
        return None
    return _pair(prompt, chosen, rejected, rec)


@register_preference_format("trl_preference", ("chosen", "rejected"))
def parse_trl_preference(obj: dict, rec: _Record) -> PreferencePair | None:
    rec.unknown_keys(obj, ("prompt", "chosen", "rejected"), "record", level="warning")
    for key in ("chosen", "rejected"):
        if key not in obj:
            rec.error("missing_field", f"record has no '{key}'")
    if rec.failed:
        return None
    raw_prompt, raw_chosen, raw_rejected = obj.get("prompt"), obj["chosen"], obj["rejected"]
    plain = [isinstance(v, str) for v in (raw_prompt, raw_chosen, raw_rejected) if v is not None]
    if any(plain) and not all(plain):
        rec.error("mixed_forms", "prompt, chosen and rejected must all be strings (plain text) or all lists of "
                  "messages (conversational), not a mix")
        return None
    if raw_prompt is None:  # implicit prompt: two whole conversations, the shared first turns are the prompt
        if all(plain):
            rec.error("missing_field", "record has no 'prompt' (plain-text pairs need one)")
            return None
        return _implicit_prompt(raw_chosen, raw_rejected, rec)
    if isinstance(raw_prompt, str):
        prompt = [Message("user", raw_prompt)]
    elif isinstance(raw_prompt, list) and raw_prompt:
        prompt = _openai_messages(raw_prompt, rec, "prompt")
    else:
        rec.error("invalid_prompt", "'prompt' must be a string or a non-empty list of messages")
        return None
    chosen, rejected = _answer(raw_chosen, rec, "chosen"), _answer(raw_rejected, rec, "rejected")
    if chosen is None or rejected is None or rec.failed:
        return None
    return _pair(prompt, chosen, rejected, rec)


def _implicit_prompt(raw_chosen, raw_rejected, rec: _Record) -> PreferencePair | None:
    turns = []
    for key, raw in (("chosen", raw_chosen), ("rejected", raw_rejected)):
        if not isinstance(raw, list) or not raw:
            rec.error("invalid_output", f"'{key}' must be a non-empty list of messages")
            return None
        turns.append(_openai_messages(raw, rec, key))
    if rec.failed:
        return None
    chosen, rejected = turns
    shared = 0
    while shared < min(len(chosen), len(rejected)) and asdict(chosen[shared]) == asdict(rejected[shared]):
        shared += 1
    while shared and chosen[shared - 1].role == "assistant":  # the answers start at an assistant turn
        shared -= 1
    prompt = chosen[:shared]
    answers = (_answer([asdict(m) for m in chosen[shared:]] or None, rec, "chosen"),
               _answer([asdict(m) for m in rejected[shared:]] or None, rec, "rejected"))
    if answers[0] is None or answers[1] is None:
        return None
    return _pair(prompt, answers[0], answers[1], rec)


def detect_format(obj: dict) -> str | None:
    order = [*PREFERENCE_FORMATS, *(name for name in DETECT if name not in PREFERENCE_FORMATS)]
    return next((name for name in order if any(k in obj for k in DETECT[name])), None)


def _check_conversation(messages: list[Message], rec: _Record) -> None:
    assistants = [m for m in messages if m.role == "assistant"]
    if not assistants:
        rec.error("no_assistant_message", "example has no assistant message to learn from")
    elif all(m.weight == 0 for m in assistants):
        rec.error("no_trainable_assistant", "every assistant message has weight 0: nothing to train on")
    for i, m in enumerate(messages):
        if m.role == "assistant" and not m.content.strip() and m.weight != 0:
            rec.error("empty_content", f"message {i} (assistant) has empty content")
        if m.role == "system" and i != 0:
            rec.warn("system_not_first", f"message {i} is a system message after the first turn")


def read_dataset(path: str | Path, format: str = "auto", min_examples: int = 1, raise_errors: bool = True
                 ) -> Dataset:
    """Parse a JSONL file; raise DataError listing every error unless raise_errors is False."""
    path = Path(path)
    if format != "auto" and format not in FORMATS:
        raise DataError(f"unknown data format {format!r}{did_you_mean(format, FORMATS)}; "
                        f"expected auto or one of {', '.join(FORMATS)}")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a JSONL file") from None
    ds = Dataset(str(path), format)
    file = str(path)
    records = 0
    for lineno, line_bytes in enumerate(raw.splitlines(), start=1):
        rec = _Record(file, lineno, ds.issues)
        if not line_bytes.strip():
            continue
        records += 1
        try:
            line = line_bytes.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            rec.error("invalid_encoding", f"not UTF-8 at byte {e.start + 1}")
            continue
        if json_depth(line_bytes) > MAX_JSON_DEPTH:
            rec.error("too_deep", f"arrays and objects nested deeper than {MAX_JSON_DEPTH} levels")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rec.error("invalid_json", f"column {e.colno}: {e.msg}")
            continue
        if not isinstance(obj, dict):
            rec.error("not_an_object", f"each line must be a JSON object, got {type(obj).__name__}")
            continue
        found = detect_format(obj)
        if ds.format == "auto":
            if found is None:
                rec.error("unknown_format", f"cannot tell the format from keys {sorted(obj)}; expected "
                                            "'messages', 'prompt'/'completion', 'instruction'/'output', "
                                            "'conversations', or a preference pair's 'chosen'/'rejected' or "
                                            "'preferred_output'/'non_preferred_output'")
                continue
            ds.format = found
        elif found is not None and found != ds.format:
            rec.error("format_mismatch", f"record looks like {found} but the file is {ds.format}")
            continue
        if ds.format in PREFERENCE_FORMATS:
            pair = PREFERENCE_FORMATS[ds.format](obj, rec)
            if pair is not None and not rec.failed:
                ds.pairs.append(pair)
            continue
        messages = FORMATS[ds.format](obj, rec)
        if messages is None or rec.failed:
            continue
        _check_conversation(messages, rec)
        if not rec.failed:
            ds.conversations.append(Conversation(messages, f"{file}:{lineno}"))
    if records == 0:
        ds.issues.append(Issue(file, 0, "empty_file", "the file has no records"))
    elif len(ds.examples) < min_examples:
        ds.issues.append(Issue(file, 0, "too_few_examples",
                               f"{len(ds.examples)} valid examples, at least {min_examples} needed"))
    if raise_errors and ds.errors:
        shown = "\n".join(str(i) for i in ds.errors[:50])
        more = f"\n... and {len(ds.errors) - 50} more" if len(ds.errors) > 50 else ""
        raise DataError(f"{path}: {len(ds.errors)} problem(s):\n{shown}{more}", ds.issues)
    return ds
