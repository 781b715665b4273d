"""Constrained decoding: real sampling from budwood-tiny under each grammar yields schema-valid JSON."""
import json

import jsonschema
import pytest
import torch

from budwood.engine.grammar import MAX_INDENT, GrammarCompiler, GrammarError
from budwood.models.load import TINY_NAME, load_base

MAX_TOKENS = 256

_DATE = {"type": "string", "format": "date"}
SCHEMAS = {
    "required_props": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False},
    "optional_props": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                       "note": {"type": "string", "maxLength": 8}, "flag": {"type": "boolean"}},
        "required": ["id"], "additionalProperties": False},
    "nested_object": {
        "type": "object",
        "properties": {"user": {"type": "object",
                                "properties": {"first": {"type": "string", "maxLength": 8},
                                               "admin": {"type": "boolean"}},
                                "required": ["first", "admin"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "array_min_max_items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                            "minItems": 1, "maxItems": 3},
    "string_enum": {"type": "string", "enum": ["red", "green", "blue"]},
    "mixed_enum": {"enum": [1, "two", None, True, {"k": [3]}]},
    "const": {"type": "object", "properties": {"kind": {"const": "invoice"}, "n": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 9}},
              "required": ["kind", "n"], "additionalProperties": False},
    "negative_int_range": {"type": "integer", "minimum": -50, "maximum": -10},
    "exclusive_bounds": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5},
    "multiple_of": {"type": "integer", "minimum": 0, "maximum": 100, "multipleOf": 7},
    "number_range": {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}},
                     "required": ["p"], "additionalProperties": False},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "nullable_string": {"type": ["string", "null"], "maxLength": 6},
    "any_of": {"type": "array", "items": {"anyOf": [{"type": "string", "maxLength": 4},
                                                    {"type": "integer", "minimum": 0, "maximum": 9}]},
               "maxItems": 3},
    "one_of_disjoint": {"oneOf": [{"type": "boolean"}, {"type": "integer", "minimum": 0, "maximum": 9}]},
    "pattern": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}},
                "required": ["sku"], "additionalProperties": False},
    "formats": {"type": "object",
                "properties": {"day": _DATE, "ip": {"type": "string", "format": "ipv4"},
                               "uid": {"type": "string", "format": "uuid"}},
                "required": ["day", "ip", "uid"], "additionalProperties": False},
    "string_length": {"type": "string", "minLength": 2, "maxLength": 5},
    "defs_ref": {
        "$defs": {"point": {"type": "object",
                            "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                           "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"], "additionalProperties": False},
    "array_of_objects": {
        "type": "array", "minItems": 1, "maxItems": 2,
        "items": {"type": "object",
                  "properties": {"sku": {"type": "string", "maxLength": 5},
                                 "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                  "required": ["sku", "qty"], "additionalProperties": False}},
    "nested_arrays_of_objects": {
        "type": "object",
        "properties": {"rows": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object",
            "properties": {"cells": {"type": "array", "maxItems": 2,
                                     "items": {"type": "object",
                                               "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9}},
                                               "required": ["v"], "additionalProperties": False}}},
            "required": ["cells"], "additionalProperties": False}}},
        "required": ["rows"], "additionalProperties": False},
    "tuple_prefix_items": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                            {"type": "string", "maxLength": 3},
                                                            {"type": "boolean"}],
                           "items": False, "minItems": 3},
    "all_of": {"allOf": [
        {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                          "b": {"type": "boolean"}},
         "required": ["a"], "additionalProperties": False},
        {"properties": {"a": {"minimum": 3}}, "required": ["b"]}]},
    "openai_strict_style": {
        "title": "Weather", "description": "A forecast", "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10, "description": "where"},
                       "unit": {"type": "string", "enum": ["C", "F"]},
                       "temps": {"type": "array", "items": {"type": "integer", "minimum": -40, "maximum": 50},
                                 "maxItems": 3}},
        "required": ["city", "unit", "temps"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def tiny():
    base = load_base(TINY_NAME, dtype=torch.float32, device="cpu")
    base.model.eval()
    return base


@pytest.fixture(scope="module")
def compiler(tiny):
    return GrammarCompiler(tiny.tokenizer, tiny.model.config.vocab_size, [tiny.tokenizer.eos_token_id])


def sample(tiny, grammar, seed: int) -> tuple[str, list[str]]:
    """Sample at temperature 1 over grammar-masked logits until a stop token; return the text and every
    prefix at which a stop token was allowed (each must already be a complete JSON value)."""
    tok, model = tiny.tokenizer, tiny.model
    stop = tok.eos_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "Answer in JSON."}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"]
    generator = torch.Generator().manual_seed(seed)
    matcher, out, stoppable, past = grammar.matcher(), [], [], None
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            result = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            allowed = matcher.allowed()
            assert allowed.shape == (model.config.vocab_size,)
            if allowed[stop]:
                stoppable.append(tok.decode(out))
            logits = result.logits[0, -1].float().masked_fill(~allowed, float("-inf"))
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
            matcher.accept(token)
            if token == stop:
                assert matcher.is_done()
                return tok.decode(out), stoppable
            out.append(token)
            ids = torch.tensor([[token]])
    pytest.fail(f"no stop token after {MAX_TOKENS} tokens: {tok.decode(out)!r}")


def check(value_text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(value_text), schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@pytest.mark.parametrize("name", SCHEMAS)
def test_sampled_json_matches_schema(tiny, compiler, name):
    schema = SCHEMAS[name]
    grammar = compiler.compile({"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                                        "strict": True}})
    text, stoppable = sample(tiny, grammar, seed=list(SCHEMAS).index(name))
    check(text, schema)
    assert stoppable and stoppable[-1] == text
    for prefix in stoppable:
        check(prefix, schema)


def test_json_object_accepts_any_object_and_only_objects(tiny, compiler):
    tok = tiny.tokenizer
    grammar = compiler.compile({"type": "json_object"})
    matcher = grammar.matcher()
    for token in tok.encode('{"a": [1, 2.5, {"b": null}], "c": "x\\"y"}', add_special_tokens=False):
        assert matcher.allowed()[token]
        matcher.accept(token)
    assert matcher.is_done()
    assert matcher.allowed().nonzero().flatten().tolist() == [tok.eos_token_id]
    matcher.accept(tok.eos_token_id)
    fresh = grammar.matcher()
    for not_an_object in ("[", "1", '"', " "):
        with pytest.raises(GrammarError, match="not allowed here"):
            fresh.accept(tok.encode(not_an_object, add_special_tokens=False)[0])


def test_text_needs_no_grammar_and_grammars_are_cached(compiler):
    assert compiler.compile({"type": "text"}) is None
    first = compiler.compile({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "boolean"}}})
    again = compiler.compile({"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}})
    assert first is again
    assert compiler.compile({"type": "json_object"}) is compiler.compile({"type": "json_object"})


@pytest.mark.parametrize("response_format, message", [
    ("json", "expected an object"),
    ({}, "response_format.type: None is not one of"),
    ({"type": "json_obj"}, "did you mean 'json_object'"),
    ({"type": "json_object", "schema": {}}, "unexpected field 'schema'"),
    ({"type": "json_schema"}, "response_format.json_schema: expected an object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema: expected a JSON schema object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": True}}, "expected a JSON schema object"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "json_schema.name: None must be"),
    ({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}, "json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schma": {}}}, "did you mean 'schema'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}, "strict: expected"),
])
def test_bad_response_format_shapes(compiler, response_format, message):
    with pytest.raises(GrammarError, match=message):
        compiler.compile(response_format)


@pytest.mark.parametrize("schema, message", [
    ({"type": "foo"}, "Invalid type: foo"),
    ({"type": "string", "minLength": "x"}, "minLength"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}, "/\\$defs/nope"),
    ({"type": "string", "pattern": "(ab"}, "unclosed group"),
    ({"type": "string", "format": "shoe-size"}, "Unknown format: shoe-size"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum \\(5\\) is greater than maximum \\(1\\)"),
    ({"not": {"type": "string"}}, "Unimplemented keys: \\[\"not\"\\]"),
    ({"$ref": "https://example.com/remote.json"}, "does not fetch"),
])
def test_invalid_or_unsupported_schema_names_the_problem(compiler, schema, message):
    with pytest.raises(GrammarError, match="(?s)response_format.json_schema.schema: .*" + message):
        compiler.compile({"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}})


def test_disallowed_token_raises_and_leaves_matcher_usable(tiny, compiler):
    tok = tiny.tokenizer
    matcher = compiler.compile({"type": "json_schema", "json_schema": {
        "name": "b", "schema": {"type": "boolean"}}}).matcher()
    for token in (tok.encode("{", add_special_tokens=False)[0], tok.eos_token_id, tok.pad_token_id, -1,
                  tiny.model.config.vocab_size):
        with pytest.raises(GrammarError, match=f"token {token} .*not allowed here"):
            matcher.accept(token)
    for token in tok.encode("true", add_special_tokens=False):
        matcher.accept(token)
    assert matcher.is_done()


def test_whitespace_between_tokens_is_bounded(tiny, compiler):
    tok = tiny.tokenizer
    space, newline, brace = (tok.encode(c, add_special_tokens=False) for c in (" ", "\n", "{"))
    assert len(space) == len(newline) == len(brace) == 1
    grammar = compiler.compile({"type": "json_object"})

    one_space = grammar.matcher()
    one_space.accept(brace[0])
    one_space.accept(space[0])
    assert not one_space.allowed()[space[0]] and not one_space.allowed()[newline[0]]

    indented = grammar.matcher()
    indented.accept(brace[0])
    indented.accept(newline[0])
    for _ in range(MAX_INDENT):
        indented.accept(space[0])
    assert not indented.allowed()[space[0]] and not indented.allowed()[newline[0]]
    with pytest.raises(GrammarError):
        indented.accept(space[0])
    indented.accept(tok.encode('"', add_special_tokens=False)[0])


def test_masks_cover_a_model_vocab_larger_than_the_tokenizer(tiny):
    tok = tiny.tokenizer
    padded = len(tok) + 64
    compiler = GrammarCompiler(tok, padded, [tok.eos_token_id, tok.convert_tokens_to_ids("<|user|>")])
    matcher = compiler.compile({"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "integer", "minimum": 0, "maximum": 50}}}).matcher()
    allowed = matcher.allowed()
    assert allowed.shape == (padded,) and not allowed[len(tok):].any()
    assert not allowed[tok.pad_token_id] and not allowed[tok.bos_token_id] and not allowed[tok.eos_token_id]
    matcher.accept(tok.encode("5", add_special_tokens=False)[0])
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|user|>")}
    allowed = matcher.allowed()
    assert {i for i in stops if allowed[i]} == stops and not allowed[len(tok):].any()
    assert not matcher.is_done()
    matcher.accept(tok.convert_tokens_to_ids("<|user|>"))
    assert matcher.is_done()
