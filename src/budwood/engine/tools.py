"""Tool calls in model text: which format a chat template teaches, parsing it, streaming it, forcing it.

A chat template that supports tools teaches the model one way to write a call; vLLM calls the code that
reads it back a tool parser, and picks it by a flag. budwood picks it from the template itself
(`template_tool_format`), so an adapter that ships its own template brings its own format. Two families:

- HERMES (Hermes 2 Pro, Qwen 2.5/3, budwood-tiny): each call is
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, text before the first call is content.
- LLAMA3_JSON (Llama 3.1-3.3): the whole answer is `{"name": ..., "parameters": {...}}`, several joined by
  `; `, optionally after `<|python_tag|>`.

Why here and not a library: vLLM's parsers live inside vLLM's server (its request and delta classes), and
no standalone package parses these formats. The grammar that forces a call (`tool_choice` `required` or a
named function) is llguidance's: a Lark grammar whose JSON parts are the tools' own schemas.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class ToolFormat(StrEnum):
    HERMES = "hermes"
    LLAMA3_JSON = "llama3_json"


@dataclass(frozen=True)
class ToolCall:
    """One function call as OpenAI returns it: `arguments` is the JSON text of an object."""
    name: str
    arguments: str
    id: str = ""


@dataclass
class ParsedReply:
    """A model's answer split into its text and its calls; `content` is None when there is no text."""
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"


def template_tool_format(template: str | None) -> ToolFormat | None:
    """The call format a chat template teaches, or None when it renders no tools (then serving refuses
    `tools`, and training refuses tool data, rather than silently leaving them out)."""
    if not template or "tools" not in template:
        return None
    if _HERMES_OPEN in template:
        return ToolFormat.HERMES
    if _PYTHON_TAG in template or '"parameters"' in template:
        return ToolFormat.LLAMA3_JSON
    return None


def _call_from(obj, args_key: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in args_key if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False), new_call_id())


def parse_tool_calls(text: str, fmt: ToolFormat) -> ParsedReply:
    """Calls and text of a whole answer. An answer whose calls do not all parse is returned as text with no
    calls (vLLM does the same): a half-understood call is never executed."""
    if fmt is ToolFormat.HERMES:
        start = text.find(_HERMES_OPEN)
        if start < 0:
            return ParsedReply(text)
        calls = []
        for m in re.finditer(r"<tool_call>(.*?)(?:</tool_call>|\Z)", text[start:], re.DOTALL):
            try:
                call = _call_from(json.loads(m.group(1).strip()))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return ParsedReply(text)
            calls.append(call)
        return ParsedReply(text[:start] or None, calls)
    calls = _llama_calls(text)
    return ParsedReply(None, calls) if calls else ParsedReply(text)


def _llama_calls(text: str) -> list[ToolCall]:
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    if not body.startswith("{"):
        return []
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(body):
        try:
            obj, pos = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return []
        call = _call_from(obj, ("parameters", "arguments"))
        if call is None:
            return []
        calls.append(call)
        rest = body[pos:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        pos = len(body) - len(rest)
    return calls


# -- streaming --------------------------------------------------------------------------------------------
@dataclass
class ContentDelta:
    text: str


@dataclass
class CallStart:
    """A new call: OpenAI's first tool_calls delta for an index carries its id, type and name."""
    index: int
    id: str
    name: str


@dataclass
class ArgumentsDelta:
    index: int
    text: str


StreamEvent = ContentDelta | CallStart | ArgumentsDelta

_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')


class _ValueEnd:
    """Finds where one JSON value ends in text that arrives in pieces: tracks strings, escapes and depth."""

    def __init__(self):
        self.depth, self.in_string, self.escaped, self.started = 0, False, False, False

    def scan(self, text: str) -> int | None:
        """The length of `text` that belongs to the value, if the value ends within it."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string, self.started = True, True
            elif ch in "{[":
                self.depth, self.started = self.depth + 1, True
            elif ch in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return i + 1
            elif self.started and self.depth == 0 and ch in ",}":
                return i
            elif not ch.isspace():
                self.started = True
        return None


class ToolCallStream:
    """Turns an answer's text deltas into content deltas and OpenAI's tool_calls deltas as they arrive.

    HERMES: text streams as content until `<tool_call>` (a suffix that could begin it is held back); a call's
    name is sent as soon as it is written and its arguments fragment by fragment; text after the first call
    is not content, as in `parse_tool_calls`. A call written in another key order is sent whole at its
    end. LLAMA3_JSON: an answer that begins with `{` is held and sent as calls at the end.
    """

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.pending = ""  # text not yet sent
        self.in_call = False
        self.calls = 0
        self.header_sent = False
        self.value: _ValueEnd | None = None
        self.args_done = False
        self.decided = fmt is ToolFormat.HERMES  # llama: is this answer a call? (known at its first character)
        self.holding = False

    @property
    def called(self) -> bool:
        return self.calls > 0

    def feed(self, text: str) -> list[StreamEvent]:
        self.pending += text
        if self.fmt is ToolFormat.LLAMA3_JSON:
            return self._feed_llama()
        events: list[StreamEvent] = []
        while True:
            before = (self.in_call, len(self.pending), self.header_sent, self.args_done)
            events += self._step_call() if self.in_call else self._step_outside()
            if (self.in_call, len(self.pending), self.header_sent, self.args_done) == before:
                return events

    def finish(self) -> list[StreamEvent]:
        """Whatever was held back, at the end of the answer."""
        if self.fmt is ToolFormat.LLAMA3_JSON:
            if not self.holding:
                return [ContentDelta(self.pending)] if self.pending else []
            return self._whole(self.pending)
        rest, self.pending = self.pending, ""
        if not self.in_call:
            return [ContentDelta(rest)] if rest and not self.called else []
        if self.header_sent:
            return []
        events = self._whole(rest.split(_HERMES_CLOSE, 1)[0])
        return events or ([ContentDelta(_HERMES_OPEN + rest)] if not self.called else [])

    def _step_outside(self) -> list[StreamEvent]:
        start = self.pending.find(_HERMES_OPEN)
        if start >= 0:
            text, self.pending = self.pending[:start], self.pending[start + len(_HERMES_OPEN):]
            self.in_call, self.header_sent, self.value, self.args_done = True, False, None, False
            return [ContentDelta(text)] if text and not self.called else []
        keep = next((k for k in range(min(len(_HERMES_OPEN) - 1, len(self.pending)), 0, -1)
                     if _HERMES_OPEN.startswith(self.pending[-k:])), 0)
        text = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(text):]
        return [ContentDelta(text)] if text and not self.called else []

    def _step_call(self) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if not self.header_sent:
            m = _HEADER.match(self.pending)
            if m is None:
                close = self.pending.find(_HERMES_CLOSE)
                if close < 0:
                    return []
                body, self.pending = self.pending[:close], self.pending[close + len(_HERMES_CLOSE):]
                self.in_call = False
                return self._whole(body)
            try:
                name = json.loads(f'"{m.group(1)}"')
            except json.JSONDecodeError:
                name = m.group(1)
            events.append(CallStart(self.calls, new_call_id(), name))
            self.calls += 1
            self.header_sent, self.value = True, _ValueEnd()
            self.pending = self.pending[m.end():]
        if not self.args_done:
            end = self.value.scan(self.pending)
            fragment = self.pending if end is None else self.pending[:end]
            if fragment.strip() or fragment and end is None:
                events.append(ArgumentsDelta(self.calls - 1, fragment))
            self.pending = self.pending[len(fragment):]
            self.args_done = end is not None
        if self.args_done:
            close = self.pending.find(_HERMES_CLOSE)
            if close >= 0:
                self.pending = self.pending[close + len(_HERMES_CLOSE):]
                self.in_call = False
        return events

    def _whole(self, body: str) -> list[StreamEvent]:
        reply = parse_tool_calls(body if self.fmt is ToolFormat.LLAMA3_JSON else f"{_HERMES_OPEN}{body}"
                                 f"{_HERMES_CLOSE}", self.fmt)
        events: list[StreamEvent] = []
        for call in reply.tool_calls:
            events += [CallStart(self.calls, call.id, call.name), ArgumentsDelta(self.calls, call.arguments)]
            self.calls += 1
        if not reply.tool_calls and self.fmt is ToolFormat.LLAMA3_JSON:
            events.append(ContentDelta(body))
        return events

    def _feed_llama(self) -> list[StreamEvent]:
        if not self.decided:
            head = self.pending.lstrip()
            if not head or _PYTHON_TAG.startswith(head):
                return []
            self.decided = True
            self.holding = head.removeprefix(_PYTHON_TAG).lstrip().startswith("{") or head == _PYTHON_TAG
        if self.holding:
            return []
        text, self.pending = self.pending, ""
        return [ContentDelta(text)] if text else []


# -- forcing a call ---------------------------------------------------------------------------------------
def _call_schema(fmt: ToolFormat, tool: dict) -> dict:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    key = "arguments" if fmt is ToolFormat.HERMES else "parameters"
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, key: params},
            "required": ["name", key], "additionalProperties": False}


def tool_call_grammar(fmt: ToolFormat, tools: Sequence[dict], parallel: bool) -> str:
    """A Lark grammar (llguidance's dialect) for one call, or one or more when `parallel`, to `tools`
    (OpenAI tool objects), written as the template writes them: the separators of Python's json.dumps,
    which is what jinja's `tojson` renders, so a forced call looks exactly like a trained one."""
    options = [_call_schema(fmt, t) for t in tools]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ",
                                       "key_separator": ": "}}
    body = f"%json {json.dumps(schema, ensure_ascii=False)}"
    if fmt is ToolFormat.HERMES:
        call, sep = 'call: "<tool_call>\\n" body "\\n</tool_call>"', '"\\n"'
    else:
        call, sep = "call: body", '"; "'
    start = f"start: call ({sep} call)*" if parallel else "start: call"
    return f"{start}\n{call}\nbody: {body}\n"
