"""Chat with tools and schemas as a user drives it: Python functions that Chat calls itself
(approved, bounded), OpenAI-style tools answered by the caller, calls and results kept in the
history, saved and undone; the prompt a Chat builds equals the server's mapping of the same
conversation. Tiny random weights with the real tokenizer: the calls are the constraint's doing.
The functions take choices (Literal, bool) so that random weights have short arguments."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
from test_chat import tiny_model

from gemma_mlx import BadRequest, Chat
from gemma_mlx.chat import Message
from gemma_mlx.prompt import encode, render
from gemma_mlx.tools import ToolCall, gemma_messages, tools_from

CALLED: list[dict] = []


def get_weather(city: Literal["Paris", "Oslo", "Rome"], metric: bool = True) -> dict:
    """The current weather in a city.

    Args:
        city: Which city.
        metric: Celsius (true) or Fahrenheit.
    """
    CALLED.append({"city": city, "metric": metric})
    return {"city": city, "temp": 18 if metric else 64}


SEARCH = {"type": "function", "function": {"name": "search", "description": "Web search.",
                                           "parameters": {"type": "object", "properties": {
                                               "query": {"enum": ["news", "maps"]}},
                                               "required": ["query"],
                                               "additionalProperties": False}}}
SETTINGS = dict(temp=0, max_tokens=48)


@pytest.fixture(scope="module")
def tokenizer(model_270m):
    return model_270m.tokenizer


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_model(tokenizer, "tiny-tools", sliding_window=512)


@pytest.fixture(autouse=True)
def clear_calls():
    CALLED.clear()


def test_chat_runs_python_tools_until_the_model_answers_in_text(tiny):
    chat = Chat(tiny, **SETTINGS)
    asked: list[ToolCall] = []
    chunks = list(chat.stream("Weather in Paris?", tools=[get_weather], tool_choice="required",
                              approve=lambda call: asked.append(call) or True))
    calls_chunk = next(c for c in chunks if c.finish_reason == "tool_calls")
    assert calls_chunk.tool_calls == asked and len(asked) >= 1
    schema = tools_from([get_weather])[0].parameters
    for call in asked:
        jsonschema.validate(call.arguments, schema)
    assert CALLED == [{"metric": True, **c.arguments} for c in asked]
    roles = [m.role for m in chat.messages]
    assert roles == ["user", "assistant", *["tool"] * len(asked), "assistant"]
    reply, results = chat.messages[1], chat.messages[2:-1]
    assert reply.tool_calls == asked and reply.text == ""
    assert [r.tool_call_id for r in results] == [c.id for c in asked]
    assert json.loads(results[0].text)["city"] == asked[0].arguments["city"]
    assert not chat.messages[-1].tool_calls  # the follow-up ("auto") answered in text
    assert chunks[-1].finish_reason in ("stop", "length") and not chunks[-1].tool_calls
    # The follow-up prefilled only the results turn: definitions, message and call were
    # already in the cache.
    results_turn = chat._prompt(chat.messages[:-1]).ids
    before = chat._prompt(chat.messages[:2], generation_prompt=False).ids
    assert chat.session.prefilled_tokens <= len(results_turn) - len(before) + 1


def test_a_declined_call_is_not_run_and_the_model_is_told(tiny):
    chat = Chat(tiny, **SETTINGS)
    chat.send("Weather?", tools=[get_weather], tool_choice="required", approve=lambda c: False)
    assert CALLED == []
    results = [m for m in chat.messages if m.role == "tool"]
    assert results and all("declined" in r.text for r in results)


def test_openai_tools_come_back_to_the_caller_and_take_results(tiny):
    chat = Chat(tiny, **SETTINGS)
    assert chat.send("News?", tools=[SEARCH], tool_choice="required") == ""
    reply = chat.messages[-1]
    assert reply.role == "assistant" and reply.tool_calls
    for call in reply.tool_calls:
        assert call.name == "search" and call.arguments["query"] in ("news", "maps")
    before = list(chat.messages)
    with pytest.raises(BadRequest, match="no call 'nope'"):
        chat.send(tool_results={"nope": "x"}, tools=[SEARCH])
    assert chat.messages == before  # nothing lost
    answers = {c.id: {"headline": "Calm day"} for c in reply.tool_calls}
    chat.send(tool_results=answers, tools=[SEARCH])
    assert [m.role for m in chat.messages[len(before):]] == \
        ["tool"] * len(answers) + ["assistant"]
    assert chat.messages[len(before)].text == '{"headline": "Calm day"}'


def test_zero_rounds_hands_the_calls_back_and_undo_takes_the_exchange(tiny):
    chat = Chat(tiny, **SETTINGS)
    chat.send("Hello")
    chat.send("Weather?", tools=[get_weather], tool_choice="required", max_tool_rounds=0)
    assert CALLED == [] and chat.messages[-1].tool_calls
    n = len(chat.messages[-1].tool_calls)
    chat.send(tool_results={c.id: "sunny" for c in chat.messages[-1].tool_calls},
              tools=[get_weather])
    assert [m.role for m in chat.messages][-n - 1:] == ["tool"] * n + ["assistant"]
    sent = chat.undo()
    assert sent.text == "Weather?" and [m.role for m in chat.messages] == ["user", "assistant"]


def test_saved_chats_keep_calls_and_results(tiny, tmp_path):
    chat = Chat(tiny, **SETTINGS)
    chat.send("Weather in Rome?", tools=[get_weather], tool_choice="required")
    loaded = Chat.load(chat.save(tmp_path / "tools.json"), tiny)
    assert loaded.messages == chat.messages
    assert any(m.tool_calls for m in loaded.messages)
    assert any(m.role == "tool" and m.tool_call_id for m in loaded.messages)
    loaded._prompted_tools = chat._prompted_tools
    assert loaded._prompt(loaded.messages).ids == chat._prompt(chat.messages).ids


def test_a_chat_prompt_equals_the_servers_mapping_of_the_same_conversation(tiny):
    """The same conversation as Chat messages and as OpenAI messages gives the same ids."""
    tools = tools_from([get_weather])
    call = ToolCall("call_1", "get_weather", {"city": "Oslo"}, '{"city": "Oslo"}')
    chat = Chat(tiny, system="Be brief.")
    chat._prompted_tools = tuple(tools)
    history = [Message("user", "Weather in Oslo?"),
               Message("assistant", "Checking.", tool_calls=[call]),
               Message("tool", '{"temp": -3}', tool_call_id="call_1", name="get_weather"),
               Message("user", "Warm enough?")]
    openai = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Weather in Oslo?"},
              {"role": "assistant", "content": "Checking.", "tool_calls": [call.openai()]},
              {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": -3}'},
              {"role": "user", "content": "Warm enough?"}]
    text = render(gemma_messages(openai, tools))
    assert chat._prompt(history).ids == encode(tiny.tokenizer, text)


def test_json_schema_replies_in_a_chat(tiny):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    chat = Chat(tiny, temp=1.0, seed=3, max_tokens=64)
    text = chat.send("Status?", json_schema=schema)
    jsonschema.validate(json.loads(text), schema)
    assert chat.messages[-1].text == text
    with pytest.raises(BadRequest, match="not both"):
        chat.send("x", tools=[get_weather], json_schema=schema)
    assert len(chat.messages) == 2


def test_the_loop_stops_after_max_tool_rounds_and_says_so(tiny, monkeypatch):
    """A model that calls again after every result (each reply forced to call here) is
    answered `max_tool_rounds` times; the last calls come back unanswered, with a notice."""
    from gemma_mlx.constrain import ReplyFormat

    monkeypatch.setattr(ReplyFormat, "follow_up", lambda self: self)
    chat = Chat(tiny, **SETTINGS)
    chat.send("Weather?", tools=[get_weather], tool_choice="required", parallel_tool_calls=False,
              max_tool_rounds=2)
    replies = [m for m in chat.messages if m.role == "assistant"]
    assert len(replies) == 3 and all(len(r.tool_calls) == 1 for r in replies)
    assert len(CALLED) == 2 and chat.messages[-1].role == "assistant"
    assert any("after 2 rounds" in n for n in chat.notices)
