"""The Gemma 3 function-calling format (tools.py) and Python functions as tools
(function_schema.py): a whole conversation rendered as the prompt the model sees, OpenAI/Ollama
messages mapped onto Gemma's turns, calls parsed out of finished and streamed replies."""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
from typing import Literal, TypedDict

import jsonschema
import pytest

from gemma_mlx.errors import BadRequest
from gemma_mlx.function_schema import function_definition
from gemma_mlx.prompt import CHAT_TEMPLATE, render
from gemma_mlx.tools import (
    ArgumentsDelta,
    CallEnd,
    CallStart,
    ContentDelta,
    ReplyParser,
    ToolChoice,
    gemma_messages,
    parse_reply,
    tools_from,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'},
    {"role": "assistant", "content": "It is 18 °C in Paris."},
    {"role": "user", "content": "And tomorrow?"},
]

EXPECTED = """<bos><start_of_turn>user
Be brief.

You have access to functions. If you decide to invoke any of the function(s),
you MUST put it in the format of
{"name": function name, "parameters": dictionary of argument name and its value}

You SHOULD NOT include any other text in the response if you call a function
[
  {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
      "type": "object",
      "properties": {
        "city": {
          "type": "string"
        }
      },
      "required": [
        "city"
      ]
    }
  }
]
What's the weather in Paris?<end_of_turn>
<start_of_turn>model
{"name": "get_weather", "parameters": {"city": "Paris"}}<end_of_turn>
<start_of_turn>user
```tool_output
{"temp_c": 18}
```<end_of_turn>
<start_of_turn>model
It is 18 °C in Paris.<end_of_turn>
<start_of_turn>user
And tomorrow?<end_of_turn>
<start_of_turn>model
"""


def jinja_template(messages: list[dict]) -> str:
    """The official chat template itself (our copy of Google's), rendered by Jinja."""
    import jinja2

    def fail(message):
        raise ValueError(message)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = fail
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, bos_token="<bos>",
                                                 add_generation_prompt=True)


def test_a_whole_conversation_renders_as_the_documented_format():
    tools = tools_from([WEATHER])
    messages = gemma_messages(copy.deepcopy(CONVERSATION), tools)
    assert render(messages) == EXPECTED
    assert jinja_template(messages) == EXPECTED  # the same text as the official template


def test_consecutive_results_and_a_following_message_make_one_user_turn():
    calls = [{"id": f"c{i}", "type": "function",
              "function": {"name": "get_weather", "arguments": json.dumps({"city": c})}}
             for i, c in enumerate(["Paris", "Rome"])]
    messages = gemma_messages([
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c0", "content": "18"},
        {"role": "tool", "tool_call_id": "c1", "content": "24"},
        {"role": "user", "content": "Which is warmer?"}], tools_from([WEATHER]))
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == (
        'Checking both.\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n'
        '{"name": "get_weather", "parameters": {"city": "Rome"}}')
    assert messages[2]["content"] == ("```tool_output\n18\n```\n```tool_output\n24\n```\n\n"
                                      "Which is warmer?")
    assert render(messages) == jinja_template(messages)


def test_ollama_messages_without_ids_and_with_object_arguments():
    messages = gemma_messages([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "-3"}], tools_from([WEATHER]))
    assert messages[1]["content"] == '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert messages[2] == {"role": "user", "content": "```tool_output\n-3\n```"}


def test_tool_choice_none_leaves_the_definitions_out_and_lists_keep_text_together():
    tools = tools_from([WEATHER])
    plain = gemma_messages([{"role": "user", "content": "Hi"}], tools, ToolChoice("none"))
    assert plain == [{"role": "user", "content": "Hi"}]
    parts = gemma_messages([{"role": "user", "content": [
        {"type": "text", "text": "Hi"}, {"type": "image"}]}], tools)
    assert parts[0]["content"][0]["text"].endswith("]\nHi")
    assert "]\nHi<start_of_image>" in render(parts) == jinja_template(parts)


@pytest.mark.parametrize("messages, fragment", [
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}], "no assistant tool"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "function": {"name": "get_weather", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "b", "content": "1"}], "'b'"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "function": {"name": "get_weather", "arguments": "{not json"}}]}],
     "not JSON"),
    ([{"role": "robot", "content": "x"}], "'robot'"),
    ([{"role": "system", "content": "x"}], "user message"),
])
def test_bad_messages_are_refused_with_the_fix(messages, fragment):
    with pytest.raises(BadRequest, match=fragment):
        gemma_messages(messages, tools_from([WEATHER]))


def test_tools_from_every_spelling_and_bad_definitions():
    bare = {"name": "search", "parameters": {"type": "object", "properties": {}}}
    tools = tools_from([WEATHER, bare, {"type": "function", "function": {"name": "noop"}}])
    assert [t.name for t in tools] == ["get_weather", "search", "noop"]
    assert tools[0].openai() == WEATHER
    assert tools[2].parameters == {"type": "object", "properties": {}}
    for bad, fragment in [({"name": "has space"}, "not valid"),
                          ({"type": "retrieval"}, "only \"function\""),
                          ({"name": "f", "parameters": {"type": "string"}}, "type \"object\""),
                          (42, "a function or a dict")]:
        with pytest.raises(BadRequest, match=fragment):
            tools_from([bad])
    with pytest.raises(BadRequest, match="unique"):
        tools_from([WEATHER, WEATHER])


def test_tool_choice_spellings():
    tools = tools_from([WEATHER])
    assert ToolChoice.parse(None, tools) == ToolChoice("auto")
    assert ToolChoice.parse(None, []) == ToolChoice("none")
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert ToolChoice.parse(named, tools) == ToolChoice("named", "get_weather")
    assert ToolChoice.parse("get_weather", tools) == ToolChoice("named", "get_weather")
    with pytest.raises(BadRequest, match="not one of the tools"):
        ToolChoice.parse({"type": "function", "function": {"name": "nope"}}, tools)
    with pytest.raises(BadRequest, match="needs tools"):
        ToolChoice.parse("required", [])
    with pytest.raises(BadRequest, match="not valid"):
        ToolChoice.parse("sometimes", tools)


# ---- parsing replies ----------------------------------------------------------------------------

REPLY = ('Let me look.\n{"name": "get_weather", "parameters": {"city": "Paris", "days": '
         '[1, {"note": "a } and \\" inside"}]}}\n{"name": "search", "parameters": {}}')


def test_a_finished_reply_splits_into_content_and_calls():
    reply = parse_reply(REPLY)
    assert reply.content == "Let me look."
    assert [c.name for c in reply.tool_calls] == ["get_weather", "search"]
    first = reply.tool_calls[0]
    assert first.arguments == {"city": "Paris", "days": [1, {"note": 'a } and " inside'}]}
    assert json.loads(first.arguments_json) == first.arguments
    assert first.openai()["function"]["arguments"] == first.arguments_json
    assert first.ollama() == {"function": {"name": "get_weather", "arguments": first.arguments}}
    ids = [c.id for c in reply.tool_calls] + [c.id for c in parse_reply(REPLY).tool_calls]
    assert len(set(ids)) == 4 and all(i.startswith("call_") for i in ids)


@pytest.mark.parametrize("text", ["No call here.", 'Use {"name" as a key.',
                                  'x = {"name": 3}', '{"name": "f", "args": {}}'])
def test_text_that_only_looks_like_a_call_stays_content(text):
    assert parse_reply(text).content == text and parse_reply(text).tool_calls == []


def test_a_call_cut_short_is_not_a_call():
    reply = parse_reply('Sure.\n{"name": "search", "parameters": {"q": "unfinis')
    assert reply.content == "Sure." and reply.tool_calls == []


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_deltas_give_the_same_reply_and_never_leak_the_syntax(size):
    parser = ReplyParser()
    events = []
    for i in range(0, len(REPLY), size):
        events += parser.feed(REPLY[i:i + size])
    events += parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert content == "Let me look." == parser.content
    assert "{" not in content and "name" not in content
    whole = parse_reply(REPLY)
    assert [(c.name, c.arguments_json) for c in parser.calls] == \
        [(c.name, c.arguments_json) for c in whole.tool_calls]
    for index, call in enumerate(parser.calls):
        mine = [e for e in events if getattr(e, "index", None) == index]
        assert isinstance(mine[0], CallStart) and mine[0].id == call.id
        assert mine[0].name == call.name
        assert isinstance(mine[-1], CallEnd) and mine[-1].call == call
        assert "".join(e.text for e in mine if isinstance(e, ArgumentsDelta)) == \
            call.arguments_json
    starts = [i for i, e in enumerate(events) if isinstance(e, CallStart)]
    assert all(not isinstance(e, ContentDelta) for e in events[starts[0]:])


# ---- Python functions as tools ------------------------------------------------------------------

class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


@dataclasses.dataclass
class Place:
    city: str
    country: str = "FR"


class Window(TypedDict):
    start: int
    end: int


def forecast(place: Place, days: int, unit: Unit = Unit.C,
             detail: Literal["short", "long"] = "short", hours: list[int] | None = None,
             tags: dict[str, float] | None = None, window: Window | None = None,
             pair: tuple[int, str] = (1, "a"), note: str | None = None) -> str:
    """Forecast for a place.

    A second paragraph.

    Args:
        place: Where to look.
        days (int): How many days,
            counted from today.
        unit: Temperature unit.
        detail: How much to say.
    """
    return ""


def test_a_function_schema_from_hints_and_docstring_validates_its_arguments():
    d = function_definition(forecast)
    assert d["name"] == "forecast"
    assert d["description"] == "Forecast for a place.\n\nA second paragraph."
    params = d["parameters"]
    jsonschema.Draft202012Validator.check_schema(params)
    assert params["required"] == ["place", "days"]
    props = params["properties"]
    assert props["days"] == {"type": "integer",
                             "description": "How many days, counted from today."}
    assert props["unit"]["enum"] == ["celsius", "fahrenheit"] and props["unit"]["default"] == \
        "celsius"
    assert props["detail"]["enum"] == ["short", "long"]
    good = {"place": {"city": "Paris"}, "days": 3, "unit": "fahrenheit", "hours": [6, 12],
            "tags": {"rain": 0.2}, "window": {"start": 1, "end": 2}, "pair": [2, "b"],
            "note": None}
    jsonschema.validate(good, params)
    for bad in [{"days": 3}, {"place": {"city": "P"}, "days": "3"},
                {"place": {"city": "P"}, "days": 3, "unit": "kelvin"},
                {"place": {"city": "P"}, "days": 3, "pair": [1, 2]},
                {"place": {"country": "IT"}, "days": 3},
                {"place": {"city": "P"}, "days": 3, "extra": 1}]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, params)
    tool = tools_from([forecast])[0]
    assert tool.function is forecast and tool.definition() == d


def test_rest_docstrings_and_functions_we_cannot_describe():
    def lookup(key: str) -> str:
        """Find a key.

        :param key: the key to find
        """
        return key

    assert function_definition(lookup)["parameters"]["properties"]["key"]["description"] == \
        "the key to find"

    def no_hint(x):
        return x

    def star(*args: int):
        return args

    def odd(x: complex):
        return x

    def keys(x: dict[int, str]):
        return x

    for fn, fragment in [(no_hint, "parameter x has no type hint"), (star, r"\*args"),
                         (odd, "parameter x: the type complex"), (keys, "dict\\[str"),
                         (lambda x: x, "lambda")]:
        with pytest.raises(BadRequest, match=fragment):
            function_definition(fn)
