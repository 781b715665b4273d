"""Chat-template tokenisation with loss on assistant tokens only.

The conversation is rendered once with the tokenizer's own chat template (so training sees exactly
the text inference will produce), and each trainable assistant turn's character span is found by
rendering the prefix before it (with the generation prompt) and the conversation up to it. Tokens
whose first character falls in a span get labels; the rest get -100. This works for any template,
with or without `{% generation %}` markers, as long as rendering is prefix-stable.

Tool use is rendered by the template too (apply_chat_template(..., tools=...), calls with their arguments
as objects, results as "tool" messages), so the loss lands on the assistant's calls and answers and never
on tool results. A template that silently ignores tools would train on conversations with the calls cut
out, so it is a DataError whenever the data uses tools.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from budwood.data.formats import Conversation, Issue, Message, PreferencePair
from budwood.errors import DataError

IGNORE = -100

# chat template families as Axolotl's chat_template and LLaMA-Factory's template name them, each known by the
# markers its template writes; budwood always renders with the base tokenizer's own template and checks it
FAMILY_MARKERS: dict[str, tuple[str, ...]] = {
    "llama3": ("<|start_header_id|>",), "llama4": ("<|header_start|>",),
    "chatml": ("<|im_start|>",), "qwen": ("<|im_start|>",), "qwen2": ("<|im_start|>",),
    "qwen2_5": ("<|im_start|>",), "qwen_25": ("<|im_start|>",), "qwen3": ("<|im_start|>",),
    "mistral": ("[INST]",), "mistral_v1": ("[INST]",), "mistral_v2v3": ("[INST]",), "mistral_v3_tekken": ("[INST]",),
    "mistral_v7_tekken": ("[INST]",), "llama2": ("[INST]",),
    "gemma": ("<start_of_turn>",), "gemma2": ("<start_of_turn>",), "gemma3": ("<start_of_turn>",),
    "phi": ("<|user|>", "<|end|>"), "phi_3": ("<|user|>", "<|end|>"), "phi_35": ("<|user|>", "<|end|>"),
}


def template_family_problem(tokenizer, family: str) -> str | None:
    """Why the tokenizer's chat template is not of `family` (data.chat_template), or None when it is."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if family not in FAMILY_MARKERS:
        return f"unknown chat template family {family!r}; known: {', '.join(FAMILY_MARKERS)}"
    missing = [m for m in FAMILY_MARKERS[family] if m not in template]
    if not missing:
        return None
    found = [name for name, marks in FAMILY_MARKERS.items() if all(m in template for m in marks)]
    return (f"data.chat_template is {family!r} but the base tokenizer's chat template is not (it lacks "
            f"{', '.join(missing)}" + (f"; it looks like {found[0]}" if found else "") + "); budwood renders with "
            "the tokenizer's own template: set data.chat_template to its family or leave it out")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodedPair:
    """A preference pair as two token sequences (the prompt, then each answer, trained on the answer only), and
    the reference policy's summed log-probability of each answer and its token count, once computed."""

    chosen: Encoded
    rejected: Encoded
    source: str
    reference: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


class TemplateMismatch(ValueError):
    pass


def _render(tokenizer, msgs: list[dict], generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    extra = {"tools": tools} if tools else {}  # tool-free data renders exactly as before tools existed
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt, **extra)


def template_message(m: Message) -> dict:
    """A message as transformers' chat templates expect it: a call's arguments as an object, not JSON text."""
    out: dict = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"type": "function", **({"id": c.id} if c.id else {}),
                              "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                             for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


_PROBE_VALUE = "budwood-probe-value-7d1c"
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "budwood_probe_fn", "description": "probe",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]


def check_tool_support(tokenizer) -> None:
    """Refuse a chat template that drops tools, calls or results: rendered with and without a sentinel tool,
    a sentinel call and a sentinel result, each must show up in the text."""
    from jinja2 import TemplateError

    model = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    user = [{"role": "user", "content": "hi"}]
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": "call_probe", "function": {"name": "budwood_probe_fn",
                                                              "arguments": {"q": _PROBE_VALUE}}}]}
    result = {"role": "tool", "tool_call_id": "call_probe", "name": "budwood_probe_fn", "content": "probe-result-9e2"}
    try:
        plain, declared = _render(tokenizer, user), _render(tokenizer, user, tools=_PROBE_TOOLS)
        called = _render(tokenizer, [*user, call], tools=_PROBE_TOOLS)
        answered = _render(tokenizer, [*user, call, result], tools=_PROBE_TOOLS)
    except TemplateError as e:
        raise DataError(f"the chat template of {model} fails on tool use ({e}); the data has tools, so train a "
                        "base model whose chat template supports them") from None
    missing = [what for what, shown in (("the tools", declared != plain and "budwood_probe_fn" in declared),
                                        ("assistant tool_calls", _PROBE_VALUE in called),
                                        ("tool results", "probe-result-9e2" in answered)) if not shown]
    if missing:
        raise DataError(f"the chat template of {model} has no tool support: it ignores {', '.join(missing)}, so "
                        "the data's tool calls would be cut out of training. Use a base model whose chat template "
                        "renders tools (apply_chat_template(..., tools=...)), or data without tools")


def assistant_spans(tokenizer, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of trainable assistant turns (tool calls
    included; tool results are never trainable)."""
    msgs = [template_message(m) for m in conv.messages]
    tools = [t.as_dict() for t in conv.tools] if conv.tools else None
    full = _render(tokenizer, msgs, tools=tools)
    spans = []
    for i, m in enumerate(conv.messages):
        if m.role != "assistant" or m.weight == 0:
            continue
        if i:
            prefix = _render(tokenizer, msgs[:i], generation_prompt=True, tools=tools)
        else:  # templates refuse an empty conversation: take what precedes a sentinel content
            prefix = _render(tokenizer, [{"role": "assistant", "content": "\x00"}], tools=tools).split("\x00")[0]
        upto = _render(tokenizer, msgs[: i + 1], tools=tools)
        if not (full.startswith(upto) and upto.startswith(prefix)):
            raise TemplateMismatch(f"the chat template does not render turn {i} as a prefix of the whole "
                                   "conversation, so its assistant tokens cannot be located")
        spans.append((len(prefix), len(upto)))
    return full, spans


def encode_conversations(tokenizer, conversations: list[Conversation], max_seq_len: int,
                         issues: list[Issue] | None = None) -> list[Encoded]:
    """Tokenise in one batched call; over-long examples are truncated (a warning each), and examples the
    chat template rejects are left out with an error issue each (the caller decides whether to stop)."""
    return [e for e in encode_aligned(tokenizer, conversations, max_seq_len, issues) if e is not None]


def encode_aligned(tokenizer, conversations: list[Conversation], max_seq_len: int,
                   issues: list[Issue] | None = None) -> list[Encoded | None]:
    """encode_conversations, with None in the place of each example left out."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("budwood needs a fast (Rust) tokenizer for character offsets")
    from jinja2 import TemplateError

    issues = issues if issues is not None else []
    if any(conv.uses_tools for conv in conversations):
        check_tool_support(tokenizer)
    rendered: dict[int, tuple[str, list]] = {}
    for k, conv in enumerate(conversations):
        try:
            rendered[k] = assistant_spans(tokenizer, conv)
        except (TemplateError, TemplateMismatch) as e:  # e.g. a template that allows no system role
            issues.append(Issue.at(conv.source, "template_error", f"the chat template rejects this example: {e}"))
    out: list[Encoded | None] = [None] * len(conversations)
    if not rendered:
        return out
    enc = tokenizer([t for t, _ in rendered.values()], add_special_tokens=False, return_offsets_mapping=True)
    for k, (_, spans), ids, offsets in zip(rendered, rendered.values(), enc["input_ids"], enc["offset_mapping"],
                                          strict=True):
        conv = conversations[k]
        labels = [IGNORE] * len(ids)
        for t, (start, _) in enumerate(offsets):
            if any(s <= start < e for s, e in spans):
                labels[t] = ids[t]
        if len(ids) > max_seq_len:
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            issues.append(Issue.at(conv.source, "too_long", f"{len(offsets)} tokens, truncated to max_seq_len "
                                   f"{max_seq_len}", "warning"))
        if all(x == IGNORE for x in labels[1:]):
            issues.append(Issue.at(conv.source, "no_trainable_tokens",
                                   "no assistant tokens left after truncation; example skipped", "warning"))
            continue
        out[k] = Encoded(list(ids), labels, conv.source)
    return out


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_seq_len: int,
                 issues: list[Issue] | None = None) -> list[EncodedPair]:
    """Each pair's two sequences, tokenised as SFT examples are (so truncation and template errors are
    reported the same way); a pair loses both sides when either cannot be trained on."""
    issues = issues if issues is not None else []
    encoded = encode_aligned(tokenizer, [conv for pair in pairs for conv in pair.conversations()], max_seq_len,
                             issues)
    out = []
    for k, pair in enumerate(pairs):
        chosen, rejected = encoded[2 * k], encoded[2 * k + 1]
        if chosen is None or rejected is None:
            lost = "both answers" if chosen is None and rejected is None else \
                "the preferred answer" if chosen is None else "the non-preferred answer"
            issues.append(Issue.at(pair.source, "pair_skipped", f"{lost} cannot be trained on (see above); "
                                   "the pair is skipped", "warning"))
            continue
        out.append(EncodedPair(chosen, rejected, pair.source))
    return out
