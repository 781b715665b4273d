"""A chat request's tools: `tools`, `tool_choice` and `parallel_tool_calls` read as OpenAI defines them.

- `tool_choice` "none": the tools are shown to the model (as vLLM does) and its answer is text.
- "auto" (the default when tools are sent): the model answers in text or calls; calls are read from its
  text in the format its chat template teaches (engine.tools).
- "required" or a named function: decoding follows a grammar built from the tools' JSON schemas, so the
  answer is a call (one, or one or more when `parallel_tool_calls`) whose arguments parse and validate.

`finish_reason` is "tool_calls" when an answer that ended by itself called tools, except under a named
function, where OpenAI (and vLLM) send "stop".
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from budwood.data.formats import read_tool_calls, read_tools
from budwood.engine.tools import ToolFormat, tool_call_grammar
from budwood.errors import BudwoodError


class ToolChoice(StrEnum):
    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    NAMED = "named"


@dataclass(frozen=True)
class ToolRequest:
    tools: list[dict]  # OpenAI tool objects, as the chat template takes them
    choice: ToolChoice
    parallel: bool
    function: str | None = None  # the named function

    @property
    def parses(self) -> bool:
        """Whether the answer is read for calls (not under "none")."""
        return self.choice is not ToolChoice.NONE

    def grammar(self, fmt: ToolFormat) -> str | None:
        """The Lark grammar that forces a call, for "required" and a named function; None otherwise."""
        if self.choice is ToolChoice.REQUIRED:
            return tool_call_grammar(fmt, self.tools, self.parallel)
        if self.choice is ToolChoice.NAMED:
            chosen = [t for t in self.tools if t["function"]["name"] == self.function]
            return tool_call_grammar(fmt, chosen, parallel=False)
        return None

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        if called and reason == "stop" and self.choice is not ToolChoice.NAMED:
            return "tool_calls"
        return reason


def _choice(raw, tools: list[dict]) -> tuple[ToolChoice, str | None]:
    names = [t["function"]["name"] for t in tools]
    if raw is None:
        return (ToolChoice.AUTO if tools else ToolChoice.NONE), None
    if isinstance(raw, str):
        try:
            choice = ToolChoice(raw)
        except ValueError:
            choice = None
        if choice is None or choice is ToolChoice.NAMED:
            raise BudwoodError(f"tool_choice: expected 'none', 'auto', 'required' or "
                               f'{{"type": "function", "function": {{"name": ...}}}}, got {raw!r}', param="tool_choice")
        if choice is not ToolChoice.NONE and not tools:
            raise BudwoodError(f"tool_choice: {raw!r} needs tools", param="tool_choice")
        return choice, None
    if set(raw) != {"type", "function"} or raw.get("type") != "function" or not isinstance(raw["function"], dict) \
            or set(raw["function"]) != {"name"}:
        raise BudwoodError('tool_choice: a named choice is {"type": "function", "function": {"name": ...}}, '
                           f"got {raw!r}", param="tool_choice")
    name = raw["function"]["name"]
    if name not in names:
        raise BudwoodError(f"tool_choice: function {name!r} is not among the tools ({', '.join(names) or 'none'})",
                           param="tool_choice")
    return ToolChoice.NAMED, name


def tool_request(body) -> ToolRequest | None:
    """The request's tool use, checked (every problem a 400 naming its field); None without tools."""
    tools = [t.as_dict() for t in read_tools(body.tools, "tools")] if body.tools else []
    if not tools and body.tool_choice in (None, "none") and body.parallel_tool_calls is None:
        return None
    if not tools and body.parallel_tool_calls is not None:
        raise BudwoodError("parallel_tool_calls: needs tools", param="parallel_tool_calls")
    choice, function = _choice(body.tool_choice, tools)
    if not tools:
        return None
    if choice is not ToolChoice.NONE and body.response_format and body.response_format.get("type") != "text":
        raise BudwoodError("response_format: a JSON answer cannot be constrained while the model may call tools; "
                           "send tool_choice 'none' or leave response_format out", param="response_format")
    parallel = True if body.parallel_tool_calls is None else body.parallel_tool_calls
    return ToolRequest(tools, choice, parallel, function)


def history_message(i: int, m) -> dict:
    """One message of a request's history as the chat template takes it, tool calls and results included."""
    out: dict = {"role": "system" if m.role == "developer" else m.role}
    if m.tool_calls:
        if m.role != "assistant":
            raise BudwoodError(f"messages.{i}.tool_calls: only assistant messages call tools",
                               param=f"messages.{i}.tool_calls")
        calls = read_tool_calls(m.tool_calls, f"messages.{i}")
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": c.function.arguments}}
                             for c in calls]
    if m.role == "tool":
        if not m.tool_call_id:
            raise BudwoodError(f"messages.{i}.tool_call_id: a tool message answers a call and needs its id",
                               param=f"messages.{i}.tool_call_id")
        out["tool_call_id"] = m.tool_call_id
    elif m.tool_call_id is not None:
        raise BudwoodError(f"messages.{i}.tool_call_id: only tool messages carry one",
                           param=f"messages.{i}.tool_call_id")
    return out


def check_history(messages: list[dict]) -> None:
    """Every tool result answers a call made earlier in the conversation (else the template would render a
    result the model never asked for)."""
    open_ids: set[str] = set()
    for i, m in enumerate(messages):
        for call in m.get("tool_calls") or []:
            if call["id"]:
                open_ids.add(call["id"])
        if m["role"] == "tool" and m["tool_call_id"] not in open_ids:
            raise BudwoodError(f"messages.{i}.tool_call_id: {m['tool_call_id']!r} answers no earlier tool call",
                               param=f"messages.{i}.tool_call_id")
