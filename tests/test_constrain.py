"""Constrained decoding as a user meets it: replies of tiny random-weight models (the real
Gemma tokenizer) that always parse and validate against their schema, greedy and sampled;
schemas and tools we cannot enforce refused with the keyword named; stop tokens allowed exactly
when the grammar accepts; speculative decoding turned off, saying so.

Random weights know nothing of JSON, so every reply here is the grammar's doing. The schemas
bound their strings and arrays: on random weights an unbounded string never needs to end."""

from __future__ import annotations

import json

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from test_chat import tiny_model

import gemma_mlx
from gemma_mlx import BadRequest, constrain
from gemma_mlx.engine import SamplingSettings, stream_tokens
from gemma_mlx.tools import ToolChoice, parse_reply, tools_from

END_OF_TURN, EOS = 106, 1

# Every supported feature at once: types, enum, const, required, additionalProperties false,
# length / item / value bounds, nested objects and arrays, anyOf, local $ref.
EVERYTHING = {
    "$defs": {"tag": {"type": "string", "minLength": 1, "maxLength": 8}},
    "type": "object",
    "properties": {
        "kind": {"const": "order"},
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 50},
        "status": {"enum": ["open", "paid", "void"]},
        "paid": {"type": "boolean"},
        "note": {"type": ["string", "null"], "maxLength": 12},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "minItems": 1,
                 "maxItems": 3},
        "buyer": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 18, "maximum": 99}},
            "required": ["name"], "additionalProperties": False},
        "contact": {"anyOf": [
            {"type": "object", "properties": {"phone": {"type": "string",
                                                        "pattern": "^[0-9]{4,8}$"}},
             "required": ["phone"], "additionalProperties": False},
            {"type": "integer", "minimum": 0, "maximum": 9}]},
    },
    "required": ["kind", "id", "price", "status", "paid", "note", "tags", "buyer", "contact"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False}
SEARCH = {"type": "object", "properties": {"query": {"type": "string", "maxLength": 16}},
          "required": ["query"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "search", "parameters": SEARCH}}]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
SAMPLINGS = [dict(temp=0), dict(temp=1.0, seed=1), dict(temp=1.0, seed=2),
             dict(temp=0.7, top_k=0, top_p=1.0, seed=3)]


@pytest.fixture(scope="module")
def tiny(model_270m):
    return tiny_model(model_270m.tokenizer, "tiny")


def reply(model, constraint, max_tokens=200, prompt="Answer:", **sampling):
    ids = model.tokenizer.encode(prompt)
    text, chunk = "", None
    for chunk in stream_tokens(model, ids, SamplingSettings(max_tokens=max_tokens, **sampling),
                               constraint=constraint):
        text += chunk.text
    return text, chunk


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_every_supported_keyword_gives_valid_json_on_random_weights(tiny, sampling):
    grammar = constrain.json_schema(EVERYTHING)
    text, last = reply(tiny, constrain.Constraint(tiny, grammar), max_tokens=300, **sampling)
    assert last.finish_reason == "stop" and last.token in (END_OF_TURN, EOS)
    jsonschema.validate(json.loads(text), EVERYTHING)
    assert ": " in text and "\n" not in text  # compact, with json.dumps' separators


def test_any_json_object(tiny):
    for seed in (1, 2):
        text, last = reply(tiny, constrain.Constraint(tiny, constrain.json_object()),
                           max_tokens=100, temp=1.0, seed=seed)
        if last.finish_reason == "stop":  # an open object may go on past the budget
            assert isinstance(json.loads(text), dict)
        else:
            assert text.startswith("{")


@pytest.mark.parametrize("schema, keyword", [
    ({"not": {"type": "string"}}, "not"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "if"),
    ({"type": "array", "contains": {"type": "string"}}, "contains"),
    ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
    ({"dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"$ref": "https://example.com/schema.json"}, "https://example.com/schema.json"),
    ({"type": "string", "format": "credit-card"}, "credit-card"),
    ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ({"type": "strin"}, "strin"),
])
def test_schemas_we_cannot_enforce_are_refused_naming_the_keyword(schema, keyword):
    with pytest.raises(BadRequest) as e:
        constrain.json_schema(schema)
    message = str(e.value)
    assert keyword in message and "cannot be enforced" in message and "\n" not in message


def test_bad_schema_text_and_tools_name_what_is_wrong():
    with pytest.raises(BadRequest, match="not valid JSON"):
        constrain.json_schema('{"type": ')
    with pytest.raises(BadRequest, match="must be a JSON object"):
        constrain.json_schema(3)
    bad = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}}}}]
    with pytest.raises(BadRequest, match="tool lookup.*uniqueItems"):
        constrain.tool_calls(tools_from(bad), ToolChoice("required"))
    with pytest.raises(BadRequest, match="not both"):
        constrain.ReplyFormat.of(TOOLS, None, True, {"type": "object"})
    assert constrain.response_format({"type": "text"}) is None
    assert constrain.response_format({"type": "json_object"}).kind == "json_object"
    assert constrain.response_format({"type": "json_schema", "json_schema": {
        "name": "w", "schema": WEATHER, "strict": True}}).kind == "json_schema"
    assert constrain.ollama_format("json").kind == "json_object"
    assert constrain.ollama_format(WEATHER).kind == "json_schema"
    for bad_format in ({"type": "yaml"}, {"type": "json_schema"}):
        with pytest.raises(BadRequest):
            constrain.response_format(bad_format)
    with pytest.raises(BadRequest):
        constrain.ollama_format("xml")


def calls_of(text: str) -> list:
    reply = parse_reply(text)
    for call in reply.tool_calls:
        jsonschema.validate(call.arguments, SCHEMAS[call.name])
    return reply.tool_calls


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_parse_and_validate(tiny, sampling, parallel):
    tools = tools_from(TOOLS)
    grammar = constrain.tool_calls(tools, ToolChoice("required"), parallel)
    text, last = reply(tiny, constrain.Constraint(tiny, grammar), max_tokens=400, **sampling)
    assert last.finish_reason == "stop", text
    calls = calls_of(text)
    assert len(calls) >= 1 and (parallel or len(calls) == 1)
    assert parse_reply(text).content == ""  # nothing but calls


@pytest.mark.parametrize("sampling", SAMPLINGS[:2])
def test_a_named_function_is_the_one_called(tiny, sampling):
    tools = tools_from(TOOLS)
    grammar = constrain.tool_calls(tools, ToolChoice("named", "search"), parallel=False)
    text, last = reply(tiny, constrain.Constraint(tiny, grammar), **sampling)
    assert [c.name for c in calls_of(text)] == ["search"]


def test_auto_is_free_text_until_a_call_opens(tiny):
    """Random weights never open a call on their own: the reply is free text. Starting the
    reply with the call opening (as a model that decides to call does) forces a valid call."""
    grammar = constrain.tool_calls(tools_from(TOOLS), ToolChoice("auto"))
    assert grammar.lazy
    free, _ = reply(tiny, constrain.Constraint(tiny, grammar), max_tokens=30, temp=1.0, seed=0)
    assert parse_reply(free).tool_calls == [] and free
    for seed in (0, 1):
        constraint = constrain.Constraint(tiny, grammar)
        opening = tiny.tokenizer.encode('Sure. {"name"', add_special_tokens=False)
        for token in opening:
            assert bool(constraint.mask()[token])
            constraint.advance(token)
        text, last = reply(tiny, constraint, max_tokens=200, temp=1.0, seed=seed)
        calls = calls_of('Sure. {"name"' + text)
        assert last.finish_reason == "stop" and len(calls) >= 1
        assert parse_reply('Sure. {"name"' + text).content == "Sure."
    assert constrain.tool_calls(tools_from(TOOLS), ToolChoice("none")) is None


def test_stop_tokens_are_allowed_exactly_when_the_grammar_accepts(model_270m):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 99}},
              "required": ["a"], "additionalProperties": False}
    constraint = constrain.Constraint(model_270m, constrain.json_schema(schema))
    tokens = model_270m.tokenizer.encode('{"a": 42}', add_special_tokens=False)
    for token in tokens:
        mask = constraint.mask()
        assert bool(mask[END_OF_TURN]) == bool(mask[EOS]) == constraint.accepting is False
        assert bool(mask[token])
        constraint.advance(token)
    mask = constraint.mask()
    assert constraint.accepting and mask.sum().item() == 2  # complete: only the stop tokens
    assert bool(mask[END_OF_TURN]) and bool(mask[EOS])


def test_masks_kept_on_the_device_are_the_grammars_own(model_270m, monkeypatch):
    """Repeated masks come from the device's copies (two kept here, so they are also evicted
    and made again): each must still be exactly the set the grammar allows at that point."""
    monkeypatch.setattr(constrain, "KEPT_MASKS", 2)
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 30},
                                               "b": {"type": "integer"}},
              "required": ["a", "b"], "additionalProperties": False}
    constraint = constrain.Constraint(model_270m, constrain.json_schema(schema))
    reference = constrain.Constraint(model_270m, constrain.json_schema(schema))
    text = '{"a": "one two three four", "b": 12345}'
    for token in model_270m.tokenizer.encode(text, add_special_tokens=False):
        reference._fill()
        expected = np.unpackbits(reference._bits.view(np.uint8), bitorder="little")
        mask = np.array(constraint.mask())
        assert (mask == expected[:mask.size].astype(bool)).all()
        constraint.advance(token)
        reference.advance(token)
    assert len(constraint._kept) == 2


def test_ids_past_the_tokenizer_are_never_allowed(model_270m):
    """The 4B+ vocabulary has 64 ids more than the tokenizer (the image soft token...)."""
    wide = tiny_model(model_270m.tokenizer, "tiny-wide-vocab", vocab_size=262208)
    constraint = constrain.Constraint(wide, constrain.json_object())
    mask = constraint.mask()
    assert mask.shape == (262208,) and not mask[262144:].any().item()
    assert constrain.llg_tokenizer(wide) is constrain.llg_tokenizer(wide)  # built once


def test_constrained_greedy_is_the_same_compiled_or_not(tiny):
    from gemma_mlx.engine import Stats, generate_tokens

    grammar = constrain.json_schema(WEATHER)
    outs = []
    for compiled in (True, False):
        ids = generate_tokens(tiny, tiny.tokenizer.encode("x"), tiny.make_cache(),
                              SamplingSettings(temp=0, max_tokens=40), Stats(),
                              compiled=compiled, constraint=constrain.Constraint(tiny, grammar))
        out = []
        for t in ids:
            out.append(t)
            if t in (END_OF_TURN, EOS):
                break
        outs.append(out)
    assert outs[0] == outs[1] and outs[0][-1] in (END_OF_TURN, EOS)


def test_a_draft_model_is_turned_off_with_a_notice(tiny):
    text, n_notes, last = "", set(), None
    for last in gemma_mlx.stream(tiny, "x", raw=True, draft_model=tiny, temp=0, max_tokens=200,
                                 json_schema=WEATHER):
        text += last.text
        n_notes.update(last.notices)
    assert any("speculative decoding is off" in n for n in n_notes)
    assert last.stats.drafted_tokens == 0
    jsonschema.validate(json.loads(text), WEATHER)


def test_library_one_shot_tools_and_schema(tiny):
    chunks = list(gemma_mlx.stream(tiny, "Weather in Oslo?", raw=True, tools=TOOLS,
                                   tool_choice="required", temp=0, max_tokens=300))
    last = chunks[-1]
    assert last.finish_reason == "tool_calls" and last.tool_calls
    assert "".join(c.text for c in chunks) == ""  # the call syntax never reaches the text
    for call in last.tool_calls:
        jsonschema.validate(call.arguments, SCHEMAS[call.name])
        assert json.loads(call.arguments_json) == call.arguments
    text = gemma_mlx.generate(tiny, "Weather?", raw=True, json_schema=WEATHER, temp=1.0,
                              seed=4, max_tokens=200)
    jsonschema.validate(json.loads(text), WEATHER)
    mx.eval(mx.array(0))


def test_streams_decoded_together_each_keep_their_own_grammar(tiny):
    """The constraint's state is in the object, so a batch runs several side by side."""
    from gemma_mlx.batch import Batch, Stream
    from gemma_mlx.prompt import Prompt
    from gemma_mlx.session import Session

    schemas = [WEATHER, SEARCH, EVERYTHING]
    streams = [Stream(Prompt(tiny.tokenizer.encode(f"Answer {i}:")),
                      SamplingSettings(temp=1.0, seed=i, max_tokens=300), Session(tiny),
                      constraint=constrain.Constraint(tiny, constrain.json_schema(schema)))
               for i, schema in enumerate(schemas)]
    batch = Batch(tiny, max_batch=3)
    texts = {id(s): "" for s in streams}
    ends = {}
    try:
        for stream in streams:
            batch.add(stream)
        while not batch.idle:
            for stream, chunk in batch.step():
                texts[id(stream)] += chunk.text
                if chunk.finish_reason is not None:
                    ends[id(stream)] = chunk.finish_reason
    finally:
        batch.close()
    for stream, schema in zip(streams, schemas, strict=True):
        assert ends[id(stream)] == "stop"
        jsonschema.validate(json.loads(texts[id(stream)]), schema)
