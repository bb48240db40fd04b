"""Tool calling and structured output through the server, as apps use them: the official
`openai` and `ollama` clients against a real server process on a tiny random-weight model with
the official chat template. Random weights with a constraint must still give calls that parse
and match their schemas (validated with jsonschema)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import openai
import pytest
from checkpoints import write_tiny_checkpoint
from servers import running_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
RECORD = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SHORT = {"max_tokens": 120}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, folder_270m):
    # A window as long as the context: the prompt with definitions is ~330 tokens, and a ring
    # that wrapped could not be trimmed back to the prefix a follow-up shares.
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tools") / "tiny-tools", folder_270m,
                                 vision=False, sliding_window=512)


@pytest.fixture(scope="module")
def server(folder):
    with running_server("--model", str(folder)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def name(folder):
    return str(folder)


def valid_calls(calls, names=None) -> list[tuple[str, dict]]:
    out = []
    ids = set()
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.id not in ids
        ids.add(call.id)
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        assert names is None or call.function.name in names
        out.append((call.function.name, arguments))
    return out


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7}])
def test_required_calls_parse_and_match_their_schemas(client, name, sampling):
    reply = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS,
                                           tool_choice="required", **sampling, **SHORT)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(valid_calls(choice.message.tool_calls)) >= 1
    assert not choice.message.content


def test_a_named_function_and_no_parallel_calls(client, name):
    reply = client.chat.completions.create(
        model=name, messages=ASK, tools=TOOLS, parallel_tool_calls=False, temperature=1.0,
        seed=3, tool_choice={"type": "function", "function": {"name": "get_time"}}, **SHORT)
    calls = valid_calls(reply.choices[0].message.tool_calls, {"get_time"})
    assert len(calls) == 1


def test_auto_gives_text_or_a_valid_call_and_none_gives_text(client, name):
    for seed in range(3):
        reply = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS,
                                               temperature=1.0, seed=seed, **SHORT)
        message = reply.choices[0].message
        if message.tool_calls:
            valid_calls(message.tool_calls)
            assert reply.choices[0].finish_reason == "tool_calls"
        else:
            assert '{"name"' not in (message.content or "")
    plain = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS,
                                           tool_choice="none", temperature=0, max_tokens=8)
    assert plain.choices[0].message.tool_calls is None


def test_streamed_calls_come_as_openai_streams_them(client, name):
    stream = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS,
                                            tool_choice="required", temperature=0, stream=True,
                                            **SHORT)
    calls: dict[int, dict] = {}
    content = ""
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            if part.index not in calls:  # first the id and the name
                assert part.id and part.function.name and part.function.arguments == ""
                calls[part.index] = {"name": part.function.name, "arguments": ""}
            else:
                assert part.id is None
                calls[part.index]["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls and content == ""
    whole = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS,
                                           tool_choice="required", temperature=0, **SHORT)
    assert [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls] \
        == [(c["name"], c["arguments"]) for c in calls.values()]


def test_a_round_trip_with_tool_results(client, name):
    first = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS,
                                           tool_choice="required", temperature=0, **SHORT)
    message = first.choices[0].message
    follow = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        c.model_dump() for c in message.tool_calls]}]
    follow += [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temp": 21})}
               for c in message.tool_calls]
    reply = client.chat.completions.create(model=name, messages=follow, tools=TOOLS,
                                           temperature=0, max_tokens=10)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the cached conversation is reused: the results came after what the cache holds
    assert reply.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    bad = [*follow[:-1], {"role": "tool", "tool_call_id": "call_nope", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="call_nope"):
        client.chat.completions.create(model=name, messages=bad, tools=TOOLS)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 11}])
def test_json_schema_replies_validate(client, name, sampling):
    reply = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "A person, please."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person",
                                                                "schema": RECORD,
                                                                "strict": True}},
        max_tokens=200, **sampling)
    jsonschema.validate(json.loads(reply.choices[0].message.content), RECORD)
    assert reply.choices[0].finish_reason == "stop"


def test_json_object_and_ollama_format(server, client, name):
    reply = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "JSON please."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    o = ollama.Client(host=server.url, timeout=300)
    chat = o.chat(model=name, messages=[{"role": "user", "content": "A person."}],
                  format=RECORD, options={"temperature": 0, "num_predict": 200})
    jsonschema.validate(json.loads(chat.message.content), RECORD)
    generated = o.generate(model=name, prompt="JSON.", format="json",
                           options={"temperature": 0, "num_predict": 200})
    assert isinstance(json.loads(generated.response), dict)


def test_ollama_tools_render_as_openais_and_return_arguments_as_objects(server, client, name):
    """The same conversation with a call and its result, in both dialects, renders the same
    prompt; a call the model makes comes back with its arguments as an object."""
    o = ollama.Client(host=server.url, timeout=300)
    arguments = {"city": "Paris", "unit": "celsius"}
    openai_messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]
    ollama_messages = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "content": "21 degrees", "tool_name": "get_weather"}]
    one = client.chat.completions.create(model=name, messages=openai_messages, tools=TOOLS,
                                         temperature=0, max_tokens=4)
    # Raw HTTP: the ollama client rewrites tool schemas (it keeps only type, items,
    # description and enum of each property), which would change the definitions' text.
    two = httpx.post(server.url + "/api/chat", timeout=300, json={
        "model": name, "messages": ollama_messages, "tools": TOOLS, "stream": False,
        "options": {"temperature": 0, "num_predict": 4}}).json()
    assert two["prompt_eval_count"] == one.usage.prompt_tokens
    for seed in range(4):  # random weights open a call now and then
        reply = o.chat(model=name, messages=ASK, tools=TOOLS,
                       options={"temperature": 1.0, "seed": seed, "num_predict": 120})
        for call in reply.message.tool_calls or []:
            assert isinstance(call.function.arguments, dict)
            jsonschema.validate(dict(call.function.arguments), SCHEMAS[call.function.name])
    assert "tools" in o.show(name).capabilities


@pytest.mark.parametrize(("body", "fragment"), [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "nope"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(?=a)b"}}}}, "look-around"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "uniqueItems"),
    ({"response_format": {"type": "xml"}}, "xml"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "not both"),
])
def test_tools_and_schemas_we_cannot_enforce_are_400s(server, name, body, fragment):
    response = httpx.post(server.v1 + "/chat/completions", timeout=60, json={
        "model": name, "messages": ASK, **body})
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]
    bad = httpx.post(server.url + "/api/chat", timeout=60, json={
        "model": name, "messages": ASK, "format": {"not": {"type": "string"}}})
    assert bad.status_code == 400 and "not" in bad.json()["error"]
