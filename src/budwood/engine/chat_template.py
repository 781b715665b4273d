"""Chat templates rendered under a budget: an adapter's template is code from whoever published it.

transformers renders templates in jinja's ImmutableSandboxedEnvironment, which keeps a template from
reaching Python's internals but not from running for ever: `range(100000)` nested three times hangs a
server at 100 % CPU. `bounded_rendering` counts the lines of template code the rendering thread runs
(jinja compiles a template to Python whose code objects are named `<template>`; a line event also fires
on each loop iteration) and the characters the template's root function yields, and stops the
rendering with `TemplateBudgetExceeded` past either bound. Only template frames are traced, so the
tokenizer and jinja's runtime run at full speed; the thread's previous trace function (a debugger,
coverage) is restored after.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from budwood.errors import BudwoodError

TEMPLATE_CODE = "<template>"  # jinja's filename for code compiled from a string


@dataclass(frozen=True)
class TemplateBudget:
    """How much one rendering of a chat template may do."""

    max_steps: int = 2_000_000  # lines of template code executed (loop iterations included)
    max_chars: int = 4_000_000  # characters of rendered text


class TemplateBudgetExceeded(BudwoodError):
    """A chat template that ran past its budget: refused (400), naming the template."""

    code = "chat_template_limit"
    param = "messages"


class _Meter:
    """The trace functions of one rendering; raising from a trace function ends the traced frame's code."""

    def __init__(self, budget: TemplateBudget, template: str):
        self.budget, self.template = budget, template
        self.steps = self.chars = 0

    def on_call(self, frame, event, arg):
        return self.on_event if frame.f_code.co_filename == TEMPLATE_CODE else None

    def on_event(self, frame, event, arg):
        if event == "line":
            self.steps += 1
            if self.steps > self.budget.max_steps:
                sys.settrace(None)
                raise TemplateBudgetExceeded(f"{self.template} ran past its budget of {self.budget.max_steps:,} "
                                             "steps (limit template_max_steps)")
        elif event == "return" and isinstance(arg, str) and frame.f_code.co_name == "root":
            self.chars += len(arg)  # a generator's yield is a return event: each piece of output
            if self.chars > self.budget.max_chars:
                sys.settrace(None)
                raise TemplateBudgetExceeded(f"{self.template} rendered more than {self.budget.max_chars:,} "
                                             "characters (limit template_max_chars)")
        return self.on_event


@contextmanager
def bounded_rendering(budget: TemplateBudget, template: str) -> Iterator[None]:
    """Renderings of chat templates on this thread inside the block stay within `budget`; `template`
    names the template in the refusal ("adapter 'x''s chat_template.jinja")."""
    previous = sys.gettrace()
    sys.settrace(_Meter(budget, template).on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


def check_rendered(text: str, budget: TemplateBudget, template: str) -> str:
    """The output of a rendering, refused over `max_chars` whatever path produced it."""
    if len(text) > budget.max_chars:
        raise TemplateBudgetExceeded(f"{template} rendered {len(text):,} characters, more than "
                                     f"{budget.max_chars:,} (limit template_max_chars)")
    return text
