"""Read JSONL training data into one canonical conversation (SFT) or preference pair (DPO).

Forms (registered by name, auto-detected from a record's keys):
  openai             {"messages": [{"role", "content", "weight"?}]}  (OpenAI fine-tuning format)
  prompt_completion  {"prompt", "completion"}
  alpaca             {"instruction", "input"?, "output", "system"?}
  sharegpt           {"conversations": [{"from", "value"}], "system"?}
tool use (SFT only), in the forms each ecosystem writes it:
  openai    + "tools": [{"type": "function", "function": {name, description, parameters}}], "parallel_tool_calls"?;
            assistant "tool_calls": [{id, type, function: {name, arguments (a JSON string)}}] (content may be
            null), "tool" messages with "tool_call_id"  (OpenAI's fine-tuning format)
            TRL's conversational form is the same with arguments as an object, no ids, and "name" on the
            tool message: results then answer the calls in order
  sharegpt  + "tools" (a list, or a JSON string of one, of bare {name, description, parameters}), turns
            "function_call" ({"name", "arguments"} as JSON, or a list of them) and "observation"
            (LLaMA-Factory's)
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

from budwood.data.sources import MAX_JSON_DEPTH, FieldMap, RawRecord, json_depth, read_records  # noqa: F401
from budwood.errors import BudwoodError, DataError, did_you_mean

CHAT_ROLES = ("system", "user", "assistant")
ROLES = (*CHAT_ROLES, "tool")
MAX_TOOLS = 128  # per example, as OpenAI's API allows
MAX_SCHEMA_DEPTH = 16  # nesting of one function's parameters schema
MAX_SCHEMA_CHARS = 32_768  # one function's parameters schema, as JSON text
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # OpenAI's rule, plus dots (common in TRL/LLaMA-Factory data)

def _drop_none(obj):
    """A dataclass's asdict() without unset fields, so a form without tools keeps its canonical form (and
    fingerprint) from before tools existed."""
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


@dataclass
class FunctionCall:
    name: str
    arguments: str  # a JSON object as text, as OpenAI writes it (TRL's and LLaMA-Factory's objects are dumped)


@dataclass
class ToolCall:
    function: FunctionCall
    id: str | None = None  # OpenAI's; TRL and LLaMA-Factory data have none, and results answer calls in order
    type: str = "function"


@dataclass
class Function:
    """A function the model may call: its parameters are a JSON schema of the arguments object."""

    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


@dataclass
class Tool:
    function: Function
    type: str = "function"

    def as_dict(self) -> dict:
        """OpenAI's form, which apply_chat_template(tools=...) also takes."""
        return _drop_none(asdict(self))


@dataclass
class Message:
    role: str
    content: str  # "" for an assistant message that only calls tools (OpenAI's null content)
    weight: int | None = None  # assistant only: 0 = context, not trained on
    tool_calls: list[ToolCall] | None = None  # assistant only
    tool_call_id: str | None = None  # tool only: the call this result answers
    name: str | None = None  # tool only: the function whose result this is (TRL's form)

    def canonical(self) -> dict:
        return _drop_none(asdict(self))


@dataclass
class Conversation:
    messages: list[Message]
    source: str = ""  # file:line it came from
    tools: list[Tool] | None = None  # the functions this example may call
    parallel_tool_calls: bool | None = None  # False: at most one call per assistant turn

    def canonical(self) -> dict:
        out: dict = {"messages": [m.canonical() for m in self.messages]}
        if self.tools:
            out["tools"] = [t.as_dict() for t in self.tools]
        if self.parallel_tool_calls is not None:
            out["parallel_tool_calls"] = self.parallel_tool_calls
        return out

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or any(m.tool_calls or m.role == "tool" for m in self.messages)


@dataclass
class PreferencePair:
    """A prompt (the turns before the answer) and two answers to it, the preferred one first."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    source: str = ""  # file:line it came from

    def canonical(self) -> dict:
        turns = lambda ms: [m.canonical() for m in ms]  # noqa: E731
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


Parser = Callable[[dict, _Record], list[Message] | Conversation | None]
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
def parse_openai(obj: dict, rec: _Record) -> Conversation | None:
    """OpenAI's chat format, with its tool fields; TRL's conversational tool form is read by the same rules."""
    rec.unknown_keys(obj, ("messages", "tools", "parallel_tool_calls"), "record", level="warning")
    msgs = _turn_list(obj, "messages", rec)
    messages = None if msgs is None else _openai_messages(msgs, rec, "messages", tools=True)
    tools = _tools(obj.get("tools"), rec, "tools")
    parallel = obj.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        rec.error("invalid_type", f"record 'parallel_tool_calls' must be true or false, got {parallel!r}")
        parallel = None
    return None if messages is None else Conversation(messages, tools=tools, parallel_tool_calls=parallel)


_TOOL_KEYS = ("tool_calls", "function_call", "tool_call_id")


def _openai_messages(msgs: list, rec: _Record, name: str, tools: bool = False) -> list[Message]:
    """Messages in OpenAI's form; with tools False (preference data) any tool field is refused by name."""
    roles = ROLES if tools else CHAT_ROLES
    allowed = ("role", "content", "weight", "name", "tool_calls", "tool_call_id") if tools else \
        ("role", "content", "weight", "name")
    out = []
    for i, m in enumerate(msgs):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            rec.error("message_not_object", f"{where} must be an object, got {type(m).__name__}")
            continue
        refused = ("function_call",) if tools else _TOOL_KEYS
        for key in refused:
            if key in m:
                rec.error("unsupported_key", f"{where} has '{key}': " + (
                    "the legacy function_call form is not supported; write 'tool_calls'" if tools
                    else "tool calls are not supported yet"))
        rec.unknown_keys({k: v for k, v in m.items() if k not in refused},
                         allowed, where)
        role = m.get("role")
        if role is None:
            rec.error("missing_role", f"{where} has no 'role'")
            continue
        if role not in roles:
            rec.error("unknown_role", f"{where} role {role!r} is not one of {', '.join(roles)}"
                      f"{did_you_mean(str(role), roles)}")
            continue
        calls = None
        if tools and m.get("tool_calls") not in (None, []):  # exporters write null or [] on turns without calls
            if role != "assistant":
                rec.error("invalid_tool_calls", f"{where} ({role}) has 'tool_calls': only assistant messages "
                          "call tools")
                continue
            calls = _tool_calls(m["tool_calls"], rec, where)
            if calls is None:
                continue
        call_id = m.get("tool_call_id") if tools else None
        if call_id is not None and (role != "tool" or not isinstance(call_id, str) or not call_id):
            rec.error("invalid_tool_call_id", f"{where} ({role}) 'tool_call_id' must be a non-empty string on a "
                      f"tool message, got {call_id!r}")
            continue
        tool_name = m.get("name") if role == "tool" else None
        if tool_name is not None and not isinstance(tool_name, str):
            rec.error("invalid_type", f"{where} 'name' must be a string, got {type(tool_name).__name__}")
            continue
        if m.get("content") is None:
            if calls:
                out.append(Message(role, "", _weight(m, role, rec, where), calls))
                continue
            rec.error("missing_content", f"{where} ({role}) has no 'content'")
            continue
        content = _content(m["content"], rec, where)
        if content is None:
            continue
        out.append(Message(role, content, _weight(m, role, rec, where), calls, call_id, tool_name))
    return out


def _loads(text: str, rec: _Record, code: str, where: str):
    """JSON nested inside a string field: depth-checked first, as whole lines are, since json.loads recurses."""
    if json_depth(text.encode("utf-8", "surrogatepass")) > MAX_JSON_DEPTH:
        rec.error(code, f"{where} nests arrays and objects deeper than {MAX_JSON_DEPTH} levels")
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        rec.error(code, f"{where} is not valid JSON (column {e.colno}: {e.msg})")
        return None
    except ValueError as e:  # an integer of over 4,300 digits
        rec.error(code, f"{where} is not valid JSON ({str(e)[:200]})")
        return None


def _arguments(raw, rec: _Record, where: str) -> str | None:
    """A call's arguments as OpenAI's JSON text: kept as written when given as text, dumped when an object."""
    if isinstance(raw, dict):
        return json.dumps(raw, ensure_ascii=False)
    if not isinstance(raw, str):
        rec.error("bad_tool_arguments", f"{where} must be a JSON object or its text, got "
                  f"{'nothing' if raw is None else type(raw).__name__} (write {{}} for a call without arguments)")
        return None
    parsed = _loads(raw, rec, "bad_tool_arguments", where)
    if parsed is None:
        return None
    if not isinstance(parsed, dict):
        rec.error("bad_tool_arguments", f"{where} must be a JSON object, got {type(parsed).__name__}")
        return None
    return raw


def _tool_calls(raw, rec: _Record, where: str) -> list[ToolCall] | None:
    if not isinstance(raw, list):
        rec.error("invalid_tool_calls", f"{where} 'tool_calls' must be a list, got {type(raw).__name__}")
        return None
    calls: list[ToolCall] = []
    ok = True
    for k, c in enumerate(raw):
        w = f"{where}.tool_calls[{k}]"
        if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
            rec.error("invalid_tool_call", f"{w} must be an object with a 'function' object")
            ok = False
            continue
        rec.unknown_keys(c, ("id", "type", "function", "index"), w)
        rec.unknown_keys(c["function"], ("name", "arguments"), f"{w}.function")
        kind, call_id, name = c.get("type", "function"), c.get("id"), c["function"].get("name")
        arguments = _arguments(c["function"].get("arguments"), rec, f"{w}.function.arguments")
        if kind != "function":
            rec.error("invalid_tool_call", f"{w} type must be 'function', got {kind!r}")
        elif call_id is not None and (not isinstance(call_id, str) or not call_id):
            rec.error("invalid_tool_call", f"{w} id must be a non-empty string, got {call_id!r}")
        elif not isinstance(name, str) or not name:
            rec.error("invalid_tool_call", f"{w}.function has no 'name'")
        elif arguments is not None:
            calls.append(ToolCall(FunctionCall(name, arguments), call_id))
            continue
        ok = False
    if ok and len({c.id is None for c in calls}) > 1:
        rec.error("invalid_tool_call", f"{where}: either every tool call has an 'id' or none has")
        ok = False
    return calls if ok else None


def _tools(raw, rec: _Record, where: str) -> list[Tool] | None:
    """An example's tools: a list (or a JSON string of one) of function schemas, wrapped as OpenAI writes them
    or bare as LLaMA-Factory does."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = _loads(raw, rec, "invalid_tools", f"'{where}'")
        if raw is None:
            return None
    if not isinstance(raw, list):
        rec.error("invalid_tools", f"'{where}' must be a list of function schemas, got {type(raw).__name__}")
        return None
    if len(raw) > MAX_TOOLS:
        rec.error("too_many_tools", f"'{where}' has {len(raw)} tools, at most {MAX_TOOLS} allowed")
        return None
    tools: list[Tool] = []
    for k, entry in enumerate(raw):
        w = f"{where}[{k}]"
        if isinstance(entry, dict) and ("function" in entry or "type" in entry):
            rec.unknown_keys(entry, ("type", "function"), w)
            if entry.get("type") != "function":
                rec.error("invalid_tool", f"{w} type must be 'function', got {entry.get('type')!r}")
                continue
            entry, w = entry.get("function"), f"{w}.function"
        if not isinstance(entry, dict):
            rec.error("invalid_tool", f"{w} must be a function schema object, got {type(entry).__name__}")
            continue
        function = _function(entry, rec, w)
        if function is None:
            continue
        if any(t.function.name == function.name for t in tools):
            rec.error("duplicate_tool", f"{w}: a function named {function.name!r} is already declared")
            continue
        tools.append(Tool(function))
    return tools or None


def _checked(parse, raw, where: str):
    issues: list[Issue] = []
    rec = _Record("", 0, issues)
    out = parse(raw, rec, where)
    errors = [i for i in issues if i.level == "error"]
    if errors:
        raise BudwoodError(f"{errors[0].message} ({errors[0].code})", param=where, code=errors[0].code)
    return out


def read_tools(raw, where: str = "tools") -> list[Tool]:
    """A request's tools (serving's `tools` field), checked by the rules data files follow; DataError names
    the first problem and the field (BudwoodError: a request's 400)."""
    return _checked(_tools, raw, where) or []


def read_tool_calls(raw, where: str) -> list[ToolCall]:
    """An assistant message's `tool_calls` in a request's history, checked as in data files."""
    return _checked(_tool_calls, raw, where) or []


def _function(entry: dict, rec: _Record, where: str) -> Function | None:
    rec.unknown_keys(entry, ("name", "description", "parameters", "strict"), where, level="warning")
    name, description = entry.get("name"), entry.get("description")
    parameters, strict = entry.get("parameters"), entry.get("strict")
    if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
        rec.error("invalid_tool", f"{where} name must be 1-64 letters, digits, '_', '-' or '.', got {name!r}")
    elif description is not None and not isinstance(description, str):
        rec.error("invalid_tool", f"{where} description must be a string")
    elif strict is not None and not isinstance(strict, bool):
        rec.error("invalid_tool", f"{where} strict must be true or false")
    elif parameters is not None and not isinstance(parameters, dict):
        rec.error("invalid_tool", f"{where} parameters must be a JSON schema object, got "
                  f"{type(parameters).__name__}")
    elif parameters is not None and parameters.get("type", "object") != "object":
        rec.error("invalid_tool", f"{where} parameters must describe an object (the arguments), got type "
                  f"{parameters.get('type')!r}")
    elif parameters is not None and _schema_too_large(parameters, rec, where):
        pass
    elif parameters is not None and (problem := schema_problem(parameters)):
        rec.error("invalid_tool", f"{where} parameters is not a valid JSON schema: {problem}")
    else:
        return Function(name, description, parameters, strict)
    return None


def _schema_too_large(schema: dict, rec: _Record, where: str) -> bool:
    text = json.dumps(schema).encode()
    if len(text) > MAX_SCHEMA_CHARS:
        rec.error("schema_too_large", f"{where} parameters schema is {len(text)} characters of JSON, at most "
                  f"{MAX_SCHEMA_CHARS}")
    elif (depth := json_depth(text)) > MAX_SCHEMA_DEPTH:
        rec.error("schema_too_large", f"{where} parameters schema nests {depth} levels, at most "
                  f"{MAX_SCHEMA_DEPTH}")
    else:
        return False
    return True


def schema_problem(schema: dict) -> str | None:
    """Why a schema is not a valid JSON schema (checked against its meta-schema by the jsonschema package where
    installed; without it only the basic shape is checked), or None."""
    try:
        from jsonschema import exceptions, validators
    except ImportError:  # pragma: no cover - jsonschema is installed with budwood's test extra
        return None if isinstance(schema.get("properties", {}), dict) else "'properties' must be an object"
    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as e:
        return f"{e.message} (at {'/'.join(map(str, e.absolute_path)) or 'the top'})"
    return None


def arguments_problem(arguments: dict, schema: dict | None) -> str | None:
    """Why arguments do not satisfy a function's parameters schema, or None. jsonschema where installed (the
    full standard); without it the required keys, property types and enums are checked, and nothing more."""
    if not schema:
        return None
    try:
        from jsonschema import exceptions, validators
    except ImportError:  # pragma: no cover - jsonschema is installed with budwood's test extra
        return _basic_arguments_problem(arguments, schema, "arguments")
    try:
        error = exceptions.best_match(validators.validator_for(schema)(schema).iter_errors(arguments))
    except Exception as e:  # noqa: BLE001 - an unresolvable $ref and the like: the schema, not the data, is wrong
        return f"the schema cannot be applied ({type(e).__name__}: {e})"
    if error is None:
        return None
    return f"{error.message} (at {'/'.join(map(str, error.absolute_path)) or 'the top'})"


_JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
               "integer": int, "number": (int, float)}


def _basic_arguments_problem(value, schema: dict, where: str) -> str | None:
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []
    if kinds and not any(isinstance(value, _JSON_TYPES.get(k, object)) and
                         not (isinstance(value, bool) and k in ("integer", "number")) for k in kinds):
        return f"{where} must be {' or '.join(kinds)}, got {type(value).__name__}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {schema['enum']}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                return f"{where} lacks required {key!r}"
        for key, sub in (schema.get("properties") or {}).items():
            if key in value and isinstance(sub, dict):
                problem = _basic_arguments_problem(value[key], sub, f"{where}.{key}")
                if problem:
                    return problem
    return None


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
                  "model": "assistant", "system": "system", "function_call": "assistant", "observation": "tool"}


@register_format("sharegpt", ("conversations",))
def parse_sharegpt(obj: dict, rec: _Record) -> Conversation | None:
    rec.unknown_keys(obj, ("conversations", "system", "tools"), "record", level="warning")
    turns = _turn_list(obj, "conversations", rec)
    tools = _tools(obj.get("tools"), rec, "tools")
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
        if value is None:
            continue
        if who == "function_call":  # LLaMA-Factory: {"name", "arguments"} as JSON, or a list of them
            raw = _loads(value, rec, "invalid_tool_call", f"{where} value")
            if raw is None:
                continue
            wrapped = [{"type": "function", "function": c} for c in (raw if isinstance(raw, list) else [raw])]
            calls = _tool_calls(wrapped, rec, f"{where} value")
            if calls is not None:
                out.append(Message("assistant", "", weight, calls))
        else:
            out.append(Message(SHAREGPT_ROLES[who], value, weight))
    return Conversation(out, tools=tools)


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
    answers = (_answer([m.canonical() for m in chosen[shared:]] or None, rec, "chosen"),
               _answer([m.canonical() for m in rejected[shared:]] or None, rec, "rejected"))
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
        if m.role == "assistant" and not m.content.strip() and not m.tool_calls and m.weight != 0:
            rec.error("empty_content", f"message {i} (assistant) has empty content")
        if m.role == "system" and i != 0:
            rec.warn("system_not_first", f"message {i} is a system message after the first turn")


def _check_tool_use(conv: Conversation, rec: _Record) -> None:
    """Each call names a declared function with arguments its schema accepts; each tool message answers a call
    still open (by tool_call_id, or in order where the calls have no ids); ids do not repeat."""
    functions = {t.function.name: t.function for t in conv.tools or []}
    open_calls: list[ToolCall] = []  # the latest assistant turn's calls not yet answered
    seen_ids: set[str] = set()
    for i, m in enumerate(conv.messages):
        where = f"message {i} ({m.role})"
        if m.role == "tool":
            call = _answered_call(m, open_calls, rec, where)
            if call is not None and m.name is not None and m.name != call.function.name:
                rec.error("tool_name_mismatch", f"{where} is named {m.name!r} but answers a call of "
                          f"{call.function.name!r}")
            continue
        if open_calls:
            rec.error("unanswered_tool_call", f"{where} comes before the result of "
                      f"{', '.join(_call_label(c) for c in open_calls)}: every call needs a tool message first")
            open_calls = []
        if not m.tool_calls:
            continue
        if conv.parallel_tool_calls is False and len(m.tool_calls) > 1:
            rec.error("parallel_tool_calls", f"{where} makes {len(m.tool_calls)} calls but the example sets "
                      "parallel_tool_calls false")
        for c in m.tool_calls:
            if c.id is not None:
                if c.id in seen_ids:
                    rec.error("duplicate_tool_call_id", f"{where} reuses tool call id {c.id!r}")
                seen_ids.add(c.id)
            function = functions.get(c.function.name)
            if function is None:
                rec.error("unknown_function", f"{where} calls {c.function.name!r}, " + (
                    f"which is not in the example's tools{did_you_mean(c.function.name, functions)}"
                    if functions else "but the example declares no 'tools'"))
                continue
            problem = arguments_problem(json.loads(c.function.arguments), function.parameters)
            if problem:
                rec.error("arguments_schema", f"{where} calls {c.function.name!r} with arguments that break its "
                          f"parameters schema: {problem}")
        open_calls = list(m.tool_calls)


def _call_label(c: ToolCall) -> str:
    return f"call {c.id!r} ({c.function.name})" if c.id else f"the call of {c.function.name!r}"


def _answered_call(m: Message, open_calls: list[ToolCall], rec: _Record, where: str) -> ToolCall | None:
    """The open call a tool message answers, taken off the list; None after reporting why there is none."""
    if not open_calls:
        rec.error("orphan_tool_result", f"{where} answers no call: no assistant tool call is waiting for a result")
        return None
    if m.tool_call_id is None:
        if open_calls[0].id is not None:
            rec.error("missing_tool_call_id", f"{where} has no 'tool_call_id'; open calls: "
                      f"{', '.join(repr(c.id) for c in open_calls)}")
            return None
        return open_calls.pop(0)
    match = next((c for c in open_calls if c.id == m.tool_call_id), None)
    if match is None:
        rec.error("tool_call_id_mismatch", f"{where} tool_call_id {m.tool_call_id!r} matches no open call; open "
                  f"calls: {', '.join(repr(c.id) if c.id else _call_label(c) for c in open_calls)}")
        return None
    open_calls.remove(match)
    return match


def read_dataset(path: str | Path, format: str = "auto", min_examples: int = 1, raise_errors: bool = True, *,
                 split: str = "train", subset: str | None = None, fields: FieldMap | None = None) -> Dataset:
    """Parse a data source (a JSONL, JSON, CSV or Parquet file, a `datasets` folder or a Hub dataset id:
    data/sources.py); raise DataError listing every error unless raise_errors is False."""
    if format != "auto" and format not in FORMATS:
        raise DataError(f"unknown data format {format!r}{did_you_mean(format, FORMATS)}; "
                        f"expected auto or one of {', '.join(FORMATS)}")
    ds = Dataset(str(path), format)
    file = str(path)
    records = 0
    for raw in read_records(path, split=split, subset=subset, fields=fields):
        records += 1
        rec = _Record(file, raw.line, ds.issues)
        if raw.error:
            rec.error(*raw.error)
            continue
        _parse_record(raw.obj, rec, ds, f"{file}:{raw.line}")
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


def _parse_record(obj, rec: _Record, ds: Dataset, source: str) -> None:
    """One record into ds (a conversation or a pair), or its problems into rec."""
    if not isinstance(obj, dict):
        rec.error("not_an_object", f"each record must be a JSON object, got {type(obj).__name__}")
        return
    found = detect_format(obj)
    if ds.format == "auto":
        if found is None:
            rec.error("unknown_format", f"cannot tell the format from keys {sorted(obj)}; expected "
                                        "'messages', 'prompt'/'completion', 'instruction'/'output', "
                                        "'conversations', or a preference pair's 'chosen'/'rejected' or "
                                        "'preferred_output'/'non_preferred_output'")
            return
        ds.format = found
    elif found is not None and found != ds.format:
        rec.error("format_mismatch", f"record looks like {found} but the file is {ds.format}")
        return
    if ds.format in PREFERENCE_FORMATS:
        pair = PREFERENCE_FORMATS[ds.format](obj, rec)
        if pair is not None and not rec.failed:
            ds.pairs.append(pair)
        return
    parsed = FORMATS[ds.format](obj, rec)
    if parsed is None or rec.failed:
        return
    conv = parsed if isinstance(parsed, Conversation) else Conversation(parsed)
    conv.source = source
    _check_conversation(conv.messages, rec)
    _check_tool_use(conv, rec)
    if not rec.failed:
        ds.conversations.append(conv)
