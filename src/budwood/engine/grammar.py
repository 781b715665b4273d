"""JSON-schema constrained decoding: an OpenAI `response_format` becomes a per-token mask.

The engine asks a sequence's `Matcher` which token ids may come next, masks the logits with it,
samples, and reports the token back with `accept()`. llguidance does the work: it compiles a schema
in about a millisecond and computes a mask in tens of microseconds on CPU, lazily, from the
tokenizer's token trie, so no per-schema precomputation over the vocabulary is needed.

Whitespace between two JSON tokens is bounded: one space or tab, or one line break followed by at
most `MAX_INDENT` spaces or tabs. Pretty-printed JSON still fits, but a weak model cannot spend its
budget on runs of spaces and blank lines. The stop tokens are allowed exactly when the JSON value is
complete.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from budwood.errors import BudwoodError, did_you_mean

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MAX_INDENT = 16
"""Most spaces or tabs after a line break between two JSON tokens: 8 levels of 2-space indentation."""
CACHE_SIZE = 256
"""Compiled grammars kept per compiler; clients may send a new schema with every request."""

_WHITESPACE = rf"[\x20\x09]|\r?\n[\x20\x09]{{0,{MAX_INDENT}}}"
_FORMAT_TYPES = ("text", "json_object", "json_schema")
_JSON_SCHEMA_FIELDS = ("name", "schema", "strict", "description")
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class GrammarError(BudwoodError):
    """A `response_format` that is malformed or that the grammar engine cannot enforce."""


class Matcher:
    """Where one generated sequence is in its grammar; one per sequence, not shared between threads."""

    def __init__(self, ll_matcher: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, vocab_size: int):
        self._matcher = ll_matcher
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """bool[vocab_size] of the ids that may come next; the stop tokens are among them exactly when the
        JSON value is complete, and alone once nothing else can follow."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        if self._matcher.is_error():
            raise GrammarError(f"response_format: the grammar engine gave up: {self._matcher.get_error()}")
        return torch.from_numpy(np.unpackbits(bits, count=self._vocab_size, bitorder="little")).view(torch.bool)

    def accept(self, token_id: int) -> None:
        """Advance past `token_id`; a token that `allowed()` excluded raises and leaves the state as it was."""
        if self._matcher.is_stopped():
            # llguidance refuses further tokens once stopped, though its mask still offers the stop tokens
            ok = token_id in self._tokenizer.eos_tokens
        else:
            ok = 0 <= token_id < self._vocab_size and self._matcher.try_consume_tokens([token_id]) == 1
        if not ok:
            raise GrammarError(f"token {token_id} ({self._describe(token_id)}) is not allowed here "
                               "by the response_format grammar")

    def is_done(self) -> bool:
        """True once nothing but a stop token can follow (or one was accepted): the sequence may end."""
        return self._matcher.is_stopped()

    def _describe(self, token_id: int) -> str:
        if 0 <= token_id < self._tokenizer.vocab_size:
            return self._tokenizer.dbg_tokens([token_id])
        return "outside the tokenizer's vocabulary"


class Grammar:
    """A compiled response_format: immutable, shared by every request that sends the same schema."""

    def __init__(self, template: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, vocab_size: int):
        self._template = template
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size

    def matcher(self) -> Matcher:
        """A fresh matcher at the start of the grammar (a copy of a never-advanced one: no recompiling)."""
        return Matcher(self._template.deep_copy(), self._tokenizer, self._vocab_size)


class GrammarCompiler:
    """One per tokenizer; caches compiled grammars by the canonical JSON of the schema.

    `vocab_size` is the model's (its logits' width), which may exceed the tokenizer's: ids the
    tokenizer lacks, and its special tokens other than `stop_token_ids`, are never allowed.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: list[int]):
        if not stop_token_ids:
            raise ValueError("constrained decoding needs at least one stop token id")
        try:
            self._tokenizer = llguidance.hf.from_tokenizer(
                tokenizer, n_vocab=max(vocab_size, len(tokenizer)), eos_token=list(stop_token_ids))
        except ValueError as e:
            raise GrammarError(f"response_format needs a fast (Rust) tokenizer: {e}") from None
        self._vocab_size = vocab_size
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, response_format: dict) -> Grammar | None:
        """None for `{"type": "text"}`; else the grammar for any JSON object or for the given schema.

        Raises GrammarError naming the field at fault, e.g. `response_format.json_schema.schema`.
        """
        schema, where = _schema_of(response_format)
        if schema is None:
            return None
        # key order is kept, not sorted: llguidance emits object properties in the schema's order
        key = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = self._build(schema, where)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def compile_lark(self, grammar: str, where: str) -> Grammar:
        """A grammar in llguidance's Lark dialect (tool calls: engine.tools.tool_call_grammar), cached by its
        text; `where` names the request field at fault in an error."""
        key = "lark:" + grammar
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            built = self._build_spec(llguidance.LLMatcher.grammar_from_lark(grammar), where)
        except ValueError as e:
            raise GrammarError(f"{where}: {e}") from None
        with self._lock:
            self._cache[key] = built
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return built

    def _build(self, schema: dict, where: str) -> Grammar:
        try:
            spec = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_pattern": _WHITESPACE})
        except ValueError as e:
            raise GrammarError(f"{where}: {e}") from None
        return self._build_spec(spec, where)

    def _build_spec(self, spec: str, where: str) -> Grammar:
        template = llguidance.LLMatcher(self._tokenizer, spec, log_level=0)
        if template.is_error():
            raise GrammarError(f"{where}: unsupported or invalid JSON schema: {template.get_error()}")
        for warning in template.get_grammar_warnings():
            log.warning("%s: %s", where, warning)
        return Grammar(template, self._tokenizer, self._vocab_size)


def _schema_of(response_format: Any) -> tuple[dict | None, str]:
    """The JSON schema an OpenAI `response_format` asks for (None for plain text), and where it came from."""
    if not isinstance(response_format, dict):
        raise GrammarError(f'response_format: expected an object such as {{"type": "json_object"}}, '
                           f"got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind not in _FORMAT_TYPES:
        raise GrammarError(f"response_format.type: {kind!r} is not one of {', '.join(_FORMAT_TYPES)}"
                           + did_you_mean(str(kind), _FORMAT_TYPES))
    fields = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    for field in response_format:
        if field not in fields:
            raise GrammarError(f"response_format: unexpected field {field!r} for type {kind!r}"
                               + did_you_mean(str(field), fields))
    if kind == "text":
        return None, "response_format"
    if kind == "json_object":
        return {"type": "object"}, "response_format"
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise GrammarError('response_format.json_schema: expected an object {"name": ..., "schema": {...}}, '
                           f"got {type(spec).__name__}")
    for field in spec:
        if field not in _JSON_SCHEMA_FIELDS:
            raise GrammarError(f"response_format.json_schema: unexpected field {field!r}"
                               + did_you_mean(str(field), _JSON_SCHEMA_FIELDS))
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise GrammarError(f"response_format.json_schema.name: {name!r} must be 1-64 letters, digits, '_' or '-'")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise GrammarError(f"response_format.json_schema.strict: expected true or false, got {spec['strict']!r}")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise GrammarError("response_format.json_schema.schema: expected a JSON schema object, "
                           f"got {type(schema).__name__}")
    return schema, "response_format.json_schema.schema"
