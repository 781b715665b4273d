"""The tools suite: given tools and a conversation, does the model call the right function with the right
arguments, and answer in text when no tool fits?

Each item is a conversation in a training format with `tools` (OpenAI's fine-tuning form, TRL's, or
LLaMA-Factory's: what `budwood data check` reads): its last assistant turn is the reference and everything
before it the prompt. A reference with tool calls expects those calls; a reference in text expects no call.
An item may add "accepted": one object per reference call, mapping a parameter to other values that are
also right (the Berkeley Function-Calling Leaderboard's possible answers; "" among them means the parameter
may be left out). The target answers with the tools offered and tool_choice "auto", greedily.

Scoring follows BFCL's AST checker, per item:
  exact_match     the calls equal the reference's: the same functions with arguments equal as parsed JSON
  ast_match       the same functions, each with every parameter its schema requires, none the schema does
                  not declare or the reference does not give, each of the schema's type (an int where a
                  number is declared is fine) and equal to the reference's value or an accepted one, strings
                  compared case-insensitively ignoring spaces and punctuation; parallel calls are matched to
                  the reference's in any order
  function_match  the same functions called (arguments aside)
  valid_json      of the items where the model called: every call names a declared function and its arguments
                  parse as a JSON object that validates against the function's schema (jsonschema)
  irrelevance     of the items whose reference answers in text: no call made (BFCL's irrelevance detection)
  accuracy        every item: ast_match where the reference calls, irrelevance where it does not
  call_rate       share of items where the model called (or tried to, in a form that did not parse)
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from budwood.data.formats import arguments_problem, read_dataset
from budwood.errors import DataError
from budwood.eval.context import EvalContext
from budwood.eval.data import user_file
from budwood.eval.results import DataRef, SuiteResult
from budwood.eval.targets import EmittedCall, Gen, ToolPrompt, ToolReply

VERSION = "1.0"
MAX_FILE_BYTES = 64 * 2 ** 20  # an item file larger than this is refused before it is read
MAX_ITEMS = 10_000
MAX_REFERENCE_CALLS = 32  # calls in one reference turn (the matching of parallel calls is quadratic)
MAX_ACCEPTED = 64  # accepted values of one parameter


class ToolsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: Path | None = Field(None, description="tool items: JSONL in a training format with tools, the last "
                                                "assistant turn the reference (its calls, or text: no call), "
                                                "optional 'accepted' values per call; default: the demo "
                                                "company's held-out tool requests (data/demo_tools.py)")
    format: str = Field("auto", description="the item file's training format (auto | openai | sharegpt)")
    max_tokens: int = Field(192, ge=1, le=4096, description="answer length: room for the longest call set")


@dataclass(frozen=True)
class ExpectedCall:
    name: str
    arguments: dict
    accepted: dict[str, list] = field(default_factory=dict)  # parameter -> other right values ("": may omit)


@dataclass
class ToolItem:
    id: str  # where it came from (file:line)
    prompt: ToolPrompt
    expected: list[ExpectedCall]  # [] : the reference answers in text, calling nothing
    category: str  # irrelevance | simple | parallel | multi_turn

    @property
    def schemas(self) -> dict[str, dict]:
        return {t["function"]["name"]: t["function"].get("parameters") or {} for t in self.prompt.tools}


@dataclass
class Verdict:
    called: bool
    exact: bool
    ast: bool
    ast_error: str | None  # why ast_match failed, as BFCL's checker says it
    functions: bool
    valid: bool | None  # None where nothing was called


# -- reading items ---------------------------------------------------------------------------------------------
def read_items(path: str | Path, format: str = "auto") -> tuple[list[ToolItem], DataRef, int]:
    """(items, the file, examples left out) from a JSONL file, every record validated as training data is
    (file:line errors), within the suite's size and count limits. Examples that offer no tools (a validation
    split's plain chat turns: the domain suite's) are left out and counted; a file with none that does is
    refused."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file (tools eval set)")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataError(f"{path}: {size:,} bytes, over the tools suite's limit of {MAX_FILE_BYTES:,} (tools.data)")
    ref = user_file(path, "tools eval set")
    lines = path.read_bytes().splitlines()
    records = sum(1 for line in lines if line.strip())
    if records > MAX_ITEMS:
        raise DataError(f"{path}: {records:,} records, over the tools suite's limit of {MAX_ITEMS:,} (tools.data)")
    ds = read_dataset(path, format)
    if ds.kind != "sft":
        raise DataError(f"{path}: preference pairs, not tool items: the tools suite scores conversations with tools")
    items = []
    offering = [c for c in ds.conversations if c.tools]
    if not offering:
        raise DataError(f"{path}: no example offers tools: a tools item declares the functions the model may call")
    for conv in offering:
        line = int(conv.source.rsplit(":", 1)[1])
        raw = json.loads(lines[line - 1].decode("utf-8-sig"))
        items.append(item_from_record({**conv.canonical(), "accepted": raw.get("accepted")}, conv.source))
    return items, ref, len(ds.conversations) - len(offering)


def item_from_record(record: dict, where: str) -> ToolItem:
    """One item from an OpenAI fine-tuning record (tool_calls' arguments as JSON text) ending with the reference
    assistant turn; a bad item is a DataError naming `where`."""
    messages, tools = record.get("messages") or [], record.get("tools") or []
    if not tools:
        raise DataError(f"{where}: no 'tools': an item offers the functions the model may call")
    if not messages or messages[-1].get("role") != "assistant" or len(messages) < 2:
        raise DataError(f"{where}: the last message must be the reference assistant turn, after the prompt")
    reference = messages[-1].get("tool_calls") or []
    if len(reference) > MAX_REFERENCE_CALLS:
        raise DataError(f"{where}: the reference makes {len(reference)} calls, at most {MAX_REFERENCE_CALLS} "
                        "allowed")
    accepted = record.get("accepted")
    if accepted is not None and (not isinstance(accepted, list) or len(accepted) != len(reference)):
        raise DataError(f"{where}: 'accepted' must be a list with one object per reference call "
                        f"({len(reference)}), got {json.dumps(accepted)[:80]}")
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
    expected = []
    for k, call in enumerate(reference):
        fn = call["function"]
        extra = _accepted((accepted or [{}] * len(reference))[k], schemas.get(fn["name"], {}), f"{where}: "
                          f"accepted[{k}]")
        expected.append(ExpectedCall(fn["name"], json.loads(fn["arguments"]), extra))
    prompt = request_messages(messages[:-1])
    earlier = any(m["role"] == "tool" or m.get("tool_calls") for m in prompt)
    category = ("irrelevance" if not expected else "parallel" if len(expected) > 1
                else "multi_turn" if earlier else "simple")
    return ToolItem(where, ToolPrompt(prompt, tools, record.get("parallel_tool_calls")), expected, category)


def _accepted(raw, schema: dict, where: str) -> dict[str, list]:
    if not isinstance(raw, dict):
        raise DataError(f"{where} must be an object mapping a parameter to a list of accepted values")
    declared = schema.get("properties") or {}
    for name, values in raw.items():
        if not isinstance(values, list) or len(values) > MAX_ACCEPTED:
            raise DataError(f"{where}.{name} must be a list of at most {MAX_ACCEPTED} accepted values")
        if name not in declared:
            raise DataError(f"{where}.{name}: the function's schema declares no parameter {name!r}")
    return raw


def request_messages(messages: list[dict]) -> list[dict]:
    """Chat messages as a request sends them: tool calls and tool results kept, ids given where the data had
    none (TRL's and LLaMA-Factory's results answer calls in order), training-only fields (weight) left out."""
    out, open_ids = [], []
    for i, m in enumerate(messages):
        msg = {"role": m["role"], "content": m.get("content")}
        if m.get("tool_calls"):
            calls = [{"id": c.get("id") or f"call_{i}_{k}", "type": "function",
                      "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
                     for k, c in enumerate(m["tool_calls"])]
            msg = {**msg, "content": m.get("content") or None, "tool_calls": calls}
            open_ids = [c["id"] for c in calls]
        elif m["role"] == "tool":
            call_id = m.get("tool_call_id") or (open_ids[0] if open_ids else f"call_{i}")
            open_ids = [c for c in open_ids if c != call_id]
            msg["tool_call_id"] = call_id
        out.append(msg)
    return out


def demo_items(seed: int = 0) -> tuple[list[ToolItem], DataRef]:
    """The demo company's held-out tool requests (data/demo_tools.py), never trained on."""
    from budwood.data.demo_tools import tool_splits

    records = tool_splits(seed)["eval"]
    digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
    items = [item_from_record(r, f"demo:{k}") for k, r in enumerate(records)]
    return items, DataRef(name=f"company tools (seed {seed})", path=f"budwood:data/demo_tools.py#seed={seed}",
                          sha256=digest)


# -- scoring (pure) --------------------------------------------------------------------------------------------
def normalise(text: str) -> str:
    """BFCL's string comparison: case-insensitive, spaces and punctuation ignored."""
    return re.sub(r"[\W_]+", "", text.lower())


def arguments_of(call: EmittedCall) -> dict | None:
    try:
        args = json.loads(call.arguments)
    except (json.JSONDecodeError, TypeError, RecursionError):
        return None
    return args if isinstance(args, dict) else None


_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list,),
          "object": (dict,), "null": (type(None),)}


def type_ok(value, schema: dict) -> bool:
    """The value is of the parameter's declared JSON type (an int is a number; a bool is never a number)."""
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []
    if not kinds:
        return True
    for kind in kinds:
        types = _TYPES.get(kind)
        if types is None or (isinstance(value, types) and not (isinstance(value, bool) and bool not in types)):
            return True
    return False


def values_equal(got, want) -> bool:
    """BFCL's value comparison: strings normalised, numbers by value, lists in order, objects key by key."""
    if isinstance(got, bool) or isinstance(want, bool):
        return isinstance(got, bool) and isinstance(want, bool) and got == want
    if isinstance(got, int | float) and isinstance(want, int | float):
        return float(got) == float(want)
    if isinstance(got, str) and isinstance(want, str):
        return normalise(got) == normalise(want)
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(values_equal(a, b) for a, b in zip(got, want))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(values_equal(got[k], want[k]) for k in got)
    return got is None and want is None


def call_error(call: EmittedCall, expected: ExpectedCall, schema: dict) -> str | None:
    """Why one call does not match one reference call under BFCL's AST rules, or None when it does."""
    if call.name != expected.name:
        return f"called {call.name!r}, the reference calls {expected.name!r}"
    args = arguments_of(call)
    if args is None:
        return f"{call.name}: the arguments are not a JSON object"
    declared = schema.get("properties") or {}
    for name in schema.get("required") or []:
        if name not in args:
            return f"{call.name}: required parameter {name!r} missing"
    for name, value in args.items():
        if name not in declared:
            return f"{call.name}: parameter {name!r} is not in the function's schema"
        if name not in expected.arguments and name not in expected.accepted:
            return f"{call.name}: parameter {name!r} is not in the reference"
        if not type_ok(value, declared[name] if isinstance(declared[name], dict) else {}):
            return f"{call.name}: parameter {name!r} is {type(value).__name__}, the schema says {declared[name]}"
        options = ([expected.arguments[name]] if name in expected.arguments else []) + \
            [v for v in expected.accepted.get(name, []) if v != ""]
        if not any(values_equal(value, o) for o in options):
            return f"{call.name}: parameter {name!r} is {json.dumps(value)}, expected {json.dumps(options[0])}" \
                if options else f"{call.name}: parameter {name!r} must be left out"
    for name in {*expected.arguments, *expected.accepted}:
        if name not in args and "" not in expected.accepted.get(name, []):
            return f"{call.name}: parameter {name!r} missing"
    return None


def ast_error(calls: list[EmittedCall], expected: list[ExpectedCall], schemas: dict[str, dict]) -> str | None:
    """None when the calls match the reference one to one, in any order (BFCL's parallel checker)."""
    if len(calls) != len(expected):
        return f"made {len(calls)} call(s), the reference {len(expected)}"
    errors = [[call_error(c, e, schemas.get(e.name, {})) for e in expected] for c in calls]
    match: dict[int, int] = {}  # expected index -> call index

    def augment(c: int, seen: set[int]) -> bool:  # Kuhn's augmenting path
        for e in range(len(expected)):
            if errors[c][e] is None and e not in seen:
                seen.add(e)
                if e not in match or augment(match[e], seen):
                    match[e] = c
                    return True
        return False

    for c in range(len(calls)):
        if not augment(c, set()):
            if len(calls) == 1:
                return errors[0][0]
            reason = next((r for r in errors[c] if r is not None), "")
            return f"call {c} ({calls[c].name}) matches no reference call left: {reason}"
    return None


def _canonical(value):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return {k: _canonical(v) for k, v in value.items()}


def exact_match(calls: list[EmittedCall], expected: list[ExpectedCall]) -> bool:
    """The same calls (as a multiset) with arguments equal as parsed JSON; no normalisation."""
    got = []
    for c in calls:
        args = arguments_of(c)
        if args is None:
            return False
        got.append((c.name, json.dumps(_canonical(args), sort_keys=True)))
    want = [(e.name, json.dumps(_canonical(e.arguments), sort_keys=True)) for e in expected]
    return Counter(got) == Counter(want)


def valid_calls(calls: list[EmittedCall], schemas: dict[str, dict]) -> bool:
    """Every call names a declared function with arguments that parse and validate against its schema."""
    for c in calls:
        args = arguments_of(c)
        if c.name not in schemas or args is None or arguments_problem(args, schemas[c.name]) is not None:
            return False
    return True


def judge(reply: ToolReply, item: ToolItem) -> Verdict:
    called = bool(reply.calls) or reply.malformed
    schemas = item.schemas
    error = ("the answer tried to call in a form that does not parse" if reply.malformed else
             ast_error(reply.calls, item.expected, schemas))
    names = Counter(c.name for c in reply.calls) == Counter(e.name for e in item.expected)
    return Verdict(called=called, exact=not reply.malformed and exact_match(reply.calls, item.expected),
                   ast=error is None, ast_error=error, functions=not reply.malformed and names,
                   valid=(not reply.malformed and valid_calls(reply.calls, schemas)) if called else None)


# -- the suite -------------------------------------------------------------------------------------------------
def applies(provenance: dict) -> bool:
    """Whether an adapter's card lists this suite as not measured when it was not run: only an adapter trained on
    tool calls (its budwood.json counts them under data.train.tool_examples)."""
    return bool(((provenance.get("data") or {}).get("train") or {}).get("tool_examples"))


def run(ctx: EvalContext, cfg: ToolsConfig, limit: int | None, records: bool) -> SuiteResult:
    items, ref, without_tools = read_items(cfg.data, cfg.format) if cfg.data is not None else (*demo_items(), 0)
    items = items[:limit] if limit else items
    gen = Gen(max_tokens=cfg.max_tokens)
    replies: list[ToolReply] = ctx._chunked("tools: calls", [i.prompt for i in items],
                                            lambda part: ctx.target.generate_tools(part, gen))
    verdicts = [judge(r, i) for r, i in zip(replies, items)]
    calling = [(i, v) for i, v in zip(items, verdicts) if i.expected]
    texting = [v for i, v in zip(items, verdicts) if not i.expected]
    metrics = {
        "accuracy": ctx.mean([float(v.ast if i.expected else not v.called) for i, v in zip(items, verdicts)],
                             note="ast_match where the reference calls, irrelevance where it does not"),
        "ast_match": ctx.mean([float(v.ast) for _, v in calling]),
        "exact_match": ctx.mean([float(v.exact) for _, v in calling]),
        "function_match": ctx.mean([float(v.functions) for _, v in calling]),
        "valid_json": ctx.mean([float(v.valid) for v in verdicts if v.valid is not None],
                               note=None if any(v.called for v in verdicts) else "no calls made"),
        "irrelevance": ctx.mean([float(not v.called) for v in texting], note="no call where none fits"),
        "call_rate": ctx.mean([float(v.called) for v in verdicts], higher_is_better=None),
    }
    categories = sorted({i.category for i, _ in calling})
    if len(categories) > 1:
        for cat in categories:
            metrics[f"ast_match_{cat}"] = ctx.mean([float(v.ast) for i, v in calling if i.category == cat])
    skipped = {}
    if without_tools:
        skipped["examples_without_tools"] = (f"{without_tools} example(s) that offer no tools left out: the domain "
                                             "suite scores them")
    if ctx.policy is not None:
        skipped["calibrated_abstention"] = ("not applied: it replaces low-confidence text answers, and this suite "
                                            "scores the calls the model makes")
    out = SuiteResult(name="tools", version=VERSION, data=[ref], config=cfg.model_dump(mode="json"),
                      metrics=metrics, skipped=skipped)
    if records:
        out.records = [
            {"id": i.id, "category": i.category, "prompt": i.prompt.messages,
             "tools": [t["function"]["name"] for t in i.prompt.tools],
             "expected": [{"name": e.name, "arguments": e.arguments, **({"accepted": e.accepted} if e.accepted
                                                                       else {})} for e in i.expected],
             "content": r.content, "calls": [{"name": c.name, "arguments": c.arguments} for c in r.calls],
             "malformed": r.malformed, "exact_match": v.exact, "ast_match": v.ast, "ast_error": v.ast_error,
             "function_match": v.functions, "valid_json": v.valid}
            for i, r, v in zip(items, replies, verdicts)]
    return out
