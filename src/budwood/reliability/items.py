"""The two kinds of training item the recipes rewrite, seen through one small interface.

An SFT `Conversation` and a DPO `PreferencePair` both have a prompt (the turns before the answer that is
learned) whose last user turn is "the question"; the recipes read and rewrite that turn, or every turn, and
never look inside the trainer's encodings. A rewritten conversation keeps its tools, tool calls and tool results;
an item built from turns that hold tool calls carries the tools they call, or is refused by name.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

from budwood.data.formats import Conversation, Example, Message, PreferencePair, Tool
from budwood.errors import DataError


def is_pair(item: Example) -> bool:
    return isinstance(item, PreferencePair)


def question_index(messages: list[Message]) -> int | None:
    """Index of the last user turn that an assistant turn answers (the question an example teaches)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "user" and any(m.role == "assistant" for m in messages[i + 1:]):
            return i
    return None


def _prompt_index(item: Example) -> int | None:
    if is_pair(item):
        return max((i for i, m in enumerate(item.prompt) if m.role == "user"), default=None)
    return question_index(item.messages)


def question(item: Example) -> str | None:
    """The text of the item's question, or None when it has none."""
    i = _prompt_index(item)
    if i is None:
        return None
    return (item.prompt if is_pair(item) else item.messages)[i].content


def prompt(item: Example) -> list[Message]:
    """The turns up to and including the question (an SFT conversation's answer and later turns left off)."""
    if is_pair(item):
        return list(item.prompt)
    i = question_index(item.messages)
    return list(item.messages[:i + 1]) if i is not None else []


def answer(item: Example) -> str:
    """The learned answer: an SFT conversation's last assistant turn, a pair's preferred one."""
    turns = item.chosen if is_pair(item) else item.messages
    return next((m.content for m in reversed(turns) if m.role == "assistant"), "")


def system(item: Example) -> str | None:
    turns = item.prompt if is_pair(item) else item.messages
    return turns[0].content if turns and turns[0].role == "system" else None


def with_question(item: Example, text: str) -> Example:
    """A copy of the item whose question reads `text` (its source kept: the line it was made from)."""
    i = _prompt_index(item)
    if is_pair(item):
        turns = list(item.prompt)
        turns[i] = replace(turns[i], content=text)
        return replace(item, prompt=turns)
    turns = list(item.messages)
    turns[i] = replace(turns[i], content=text)
    return replace(item, messages=turns)


def map_turns(item: Example, rewrite: Callable[[Message, bool], str]) -> Example:
    """A copy with every turn's text rewritten; `rewrite(message, is_answer)` where is_answer marks the
    assistant turns (a pair's preferred and rejected answers are all answers)."""
    def turns(messages: list[Message], answers: bool) -> list[Message]:
        return [replace(m, content=rewrite(m, answers or m.role == "assistant")) for m in messages]
    if is_pair(item):
        return replace(item, prompt=turns(item.prompt, False), chosen=turns(item.chosen, True),
                       rejected=turns(item.rejected, True))
    return replace(item, messages=turns(item.messages, False))


def offered_tools(item: Example) -> list[Tool] | None:
    """The functions an SFT conversation may call (a preference pair carries none)."""
    return None if is_pair(item) else item.tools


def texts(item: Example) -> Iterator[Message]:
    """Every turn of the item."""
    if is_pair(item):
        yield from (*item.prompt, *item.chosen, *item.rejected)
    else:
        yield from item.messages


def refusal(turns: list[Message], source: str, answer_text: str, rejected: str | None = None,
            tools: list[Tool] | None = None) -> Example:
    """A training item whose target after `turns` is `answer_text`: an SFT conversation (earlier assistant
    turns kept as context, weight 0) offering `tools`, or, given the `rejected` answer, a DPO pair that prefers
    it. Turns that hold tool calls or results need the tools they call, and cannot make a preference pair
    (preference data carries no tools): both are refused by name rather than dropped."""
    context = [replace(m, weight=0) if m.role == "assistant" else m for m in turns]
    if any(m.tool_calls or m.role == "tool" for m in turns):
        if rejected is not None:
            raise DataError(f"{source or 'an example'}: its turns hold tool calls, and a preference pair carries no "
                            "tools; build preference pairs from conversations without tool use")
        if not tools:
            raise DataError(f"{source or 'an example'}: its turns hold tool calls but no tools were given for them")
    if rejected is not None:
        return PreferencePair(context, [Message("assistant", answer_text)], [Message("assistant", rejected)],
                              source)
    return Conversation([*context, Message("assistant", answer_text)], source, tools=tools or None)


def same_kind(items: list[Example], method: str) -> None:
    """Refuse a list whose items are not the method's kind (a bug in the caller, or mixed data)."""
    want = PreferencePair if method == "dpo" else Conversation
    for item in items:
        if not isinstance(item, want):
            raise DataError(f"{item.source or 'an example'}: training.method is {method} but this example is a "
                            f"{type(item).__name__}")
