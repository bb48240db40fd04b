"""Gemma 3 function calling, in one place: tool definitions in the prompt, the call syntax, the
results, and parsing calls out of a reply (whole or streamed).

Gemma 3 has no tool tokens and its chat template ignores tools. Google's Gemma docs ("Function
calling with Gemma", ai.google.dev/gemma/docs/capabilities/function-calling) prompt for it:

- the first user turn starts with an instruction and the function definitions (name,
  description, JSON-schema parameters) as a JSON list, then the user's own text (`PREAMBLE`,
  `render_definitions`);
- the model answers with a call in the format it was prompted with. We use the docs' JSON style,
  `{"name": function name, "parameters": dictionary of argument name and its value}`, because a
  JSON-schema grammar can enforce it exactly (constrain.py); parallel calls are one per line;
- the caller runs the call and gives the result back in the next user turn (Gemma's turns must
  alternate, so consecutive results merge into one user turn), each wrapped in a
  ```` ```tool_output ```` block as Google's Gemma guides hand results back ("Gemma is expecting
  to get its result back wrapped with ```tool_output```", ai.google.dev/gemma/docs/...
  function calling guides).

Entry points (the library's `generate`/`stream`/`Chat` and the server use the same ones):

    tools_from(tools)                      OpenAI-style dicts, bare definitions, Ollama dicts or
                                           Python functions -> [Tool] (BadRequest if invalid)
    ToolChoice.parse(tool_choice, tools)   OpenAI's "auto" | "none" | "required" | {"type":
                                           "function", "function": {"name": ...}}
    gemma_messages(messages, tools, choice)  OpenAI/Ollama messages (system, user, assistant with
                                           `tool_calls`, tool with `tool_call_id`) -> the plain
                                           messages `prompt.render` takes
    ReplyParser().feed(delta) / .finish()  text deltas -> ContentDelta, CallStart, ArgumentsDelta,
                                           CallEnd events; `.content` and `.calls` at the end
    parse_reply(text)                      a finished reply -> Reply(content, tool_calls)
    ToolCall.openai() / .ollama()          a call as each API returns it
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRequest
from .function_schema import function_definition

PREAMBLE = (
    "You have access to functions. If you decide to invoke any of the function(s),\n"
    "you MUST put it in the format of\n"
    '{"name": function name, "parameters": dictionary of argument name and its value}\n'
    "\n"
    "You SHOULD NOT include any other text in the response if you call a function\n")
CALL_OPENING = '{"name"'  # how every call begins: the trigger of the lazy (auto) grammar
CALL_SEPARATOR = "\n"  # between parallel calls
RESULT_OPEN, RESULT_CLOSE = "```tool_output\n", "\n```"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


# ---- tool definitions ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, description and JSON-schema parameters (an
    object schema); `function` is the Python callable, when there is one to run."""

    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: dict(EMPTY_PARAMETERS))
    function: Callable | None = field(default=None, compare=False)

    def definition(self) -> dict:
        """As the prompt lists it (the Gemma docs' shape): name, description, parameters."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["parameters"] = self.parameters
        return out

    def openai(self) -> dict:
        return {"type": "function", "function": self.definition()}


def tool_from_dict(spec: dict) -> Tool:
    """An OpenAI/Ollama tool ({"type": "function", "function": {...}}) or a bare definition."""
    if not isinstance(spec, dict):
        raise BadRequest(f"a tool must be an object with a function definition (got {spec!r})")
    if "function" in spec or "type" in spec:
        if spec.get("type", "function") != "function":
            raise BadRequest(f"tool type {spec.get('type')!r} is not supported: only "
                             "\"function\" tools")
        spec = spec.get("function")
        if not isinstance(spec, dict):
            raise BadRequest("a function tool needs \"function\": {\"name\", \"description\", "
                             "\"parameters\"}")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise BadRequest(f"tool name {name!r} is not valid: use 1-64 letters, digits, _ or -")
    description = spec.get("description") or ""
    if not isinstance(description, str):
        raise BadRequest(f"tool {name}: the description must be a string")
    parameters = spec.get("parameters")
    if parameters is None:
        parameters = dict(EMPTY_PARAMETERS)
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise BadRequest(f"tool {name}: parameters must be a JSON schema of type \"object\"")
    return Tool(name, description, parameters)


def tool_from_function(fn: Callable) -> Tool:
    """A Python function as a tool (schema from its type hints and docstring), runnable."""
    d = function_definition(fn)
    return Tool(d["name"], d.get("description", ""), d["parameters"], fn)


def tools_from(tools: Iterable[Tool | dict | Callable] | None) -> list[Tool]:
    """Tools from any mix of Tool, OpenAI/Ollama dicts and Python functions; names unique."""
    out: list[Tool] = []
    for spec in tools or ():
        if isinstance(spec, Tool):
            out.append(spec)
        elif isinstance(spec, dict):
            out.append(tool_from_dict(spec))
        elif callable(spec):
            out.append(tool_from_function(spec))
        else:
            raise BadRequest(f"a tool is a function or a dict definition (got {spec!r})")
    names = [t.name for t in out]
    for name in names:
        if names.count(name) > 1:
            raise BadRequest(f"two tools are named {name}: tool names must be unique")
    return out


@dataclass(frozen=True)
class ToolChoice:
    """Whether the model may, must or must not call: "auto", "required", "none", or "named"
    (it must call `name`)."""

    mode: str = "auto"
    name: str | None = None

    @classmethod
    def parse(cls, value: str | dict | ToolChoice | None, tools: Sequence[Tool]) -> ToolChoice:
        """OpenAI's `tool_choice` (default "auto" with tools, "none" without)."""
        if isinstance(value, ToolChoice):
            choice = value
        elif value is None:
            choice = cls("auto" if tools else "none")
        elif isinstance(value, str) and value in ("auto", "none", "required"):
            choice = cls(value)
        elif isinstance(value, dict) and isinstance(value.get("function"), dict):
            choice = cls("named", value["function"].get("name"))
        elif isinstance(value, str) and value in {t.name for t in tools}:
            choice = cls("named", value)  # the library's shorthand: a tool's name
        else:
            raise BadRequest(f"tool_choice {value!r} is not valid: use \"auto\", \"none\", "
                             "\"required\" or {\"type\": \"function\", \"function\": {\"name\": "
                             "...}}")
        if choice.mode in ("required", "named") and not tools:
            raise BadRequest(f"tool_choice {choice.mode} needs tools: pass some")
        if choice.mode == "named" and choice.name not in {t.name for t in tools}:
            raise BadRequest(f"tool_choice names {choice.name!r}, which is not one of the "
                             f"tools ({', '.join(t.name for t in tools)})")
        return choice


# ---- rendering ----------------------------------------------------------------------------------

def render_definitions(tools: Sequence[Tool]) -> str:
    """The instruction and the definitions, as the first user turn starts."""
    return PREAMBLE + json.dumps([t.definition() for t in tools], indent=2,
                                 ensure_ascii=False) + "\n"


def render_call(name: str, arguments: str | dict) -> str:
    """One call as the model writes it. `arguments` is kept as written when it is a JSON string
    (a reply's own text, so a conversation replays the tokens the model produced)."""
    if isinstance(arguments, str):
        text = arguments.strip() or "{}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRequest(f"the arguments of a call to {name} are not JSON ({e.msg}): pass "
                             "the arguments string the model returned") from e
    else:
        value, text = arguments, json.dumps(arguments, ensure_ascii=False)
    if not isinstance(value, dict):
        raise BadRequest(f"the arguments of a call to {name} must be a JSON object")
    return f'{{"name": {json.dumps(name, ensure_ascii=False)}, "parameters": {text}}}'


def render_calls(calls: Iterable[ToolCall]) -> str:
    return CALL_SEPARATOR.join(render_call(c.name, c.arguments_json) for c in calls)


def render_results(results: Iterable[str]) -> str:
    """Tool results as one user turn's text: a tool_output block each."""
    return "\n".join(f"{RESULT_OPEN}{r.strip()}{RESULT_CLOSE}" for r in results)


def result_text(value: Any) -> str:
    """A function's return value as the text of its result (JSON unless it is a string)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


# ---- OpenAI / Ollama messages to Gemma's plain messages ----------------------------------------

def gemma_messages(messages: Sequence[dict], tools: Sequence[Tool] = (),
                   choice: ToolChoice | None = None) -> list[dict]:
    """The plain messages (system / user / assistant, text or content lists) that
    `prompt.render` (equal to the official chat template) turns into the prompt:

    - the definitions go at the start of the first user turn (after the system prompt, which
      the template folds in front of it), unless `choice` is "none";
    - an assistant message's `tool_calls` become the call lines after its text;
    - `tool` messages (OpenAI's with `tool_call_id`, Ollama's without) become tool_output blocks,
      and a run of them, with a user message that follows, merges into one user turn."""
    choice = choice or ToolChoice.parse(None, tools)
    out: list[dict] = []
    pending: list[str] = []  # tool results waiting for their user turn
    call_ids: set[str] = set()  # the ids of the calls the last assistant turn made
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise BadRequest(f"message {i} has no role")
        role = "system" if message["role"] == "developer" else message["role"]
        if role == "tool":
            _check_result(message, i, out, call_ids)
            pending.append(_text(message.get("content"), i))
            continue
        if pending:
            results = render_results(pending)
            pending = []
            if role == "user":  # one user turn: the results, then the user's text
                out.append({"role": "user",
                            "content": prepend_text(results + "\n\n", message.get("content"))})
                continue
            out.append({"role": "user", "content": results})
        if role == "assistant":
            calls = message.get("tool_calls") or []
            call_ids = {c["id"] for c in calls if isinstance(c, dict) and c.get("id")}
            out.append({"role": "assistant", "content": _assistant_text(message, calls, i),
                        "tool_calls": bool(calls)})
        elif role in ("system", "user"):
            out.append({"role": role, "content": message.get("content") or ""})
        else:
            raise BadRequest(f"message {i} has role {role!r}: use system, user, assistant or "
                             "tool")
    if pending:
        out.append({"role": "user", "content": render_results(pending)})
    for m in out:
        m.pop("tool_calls", None)
    if tools and choice.mode != "none":
        first = next((m for m in out if m["role"] == "user"), None)
        if first is None:
            raise BadRequest("tools need a user message to go with (the definitions go into "
                             "the first user turn)")
        first["content"] = prepend_text(render_definitions(tools), first["content"])
    return out


def _check_result(message: dict, i: int, out: list[dict], call_ids: set[str]) -> None:
    """A tool result must follow the assistant turn that made calls (or another result), and
    answer one of its calls where both carry ids."""
    if not out or out[-1]["role"] != "assistant" or not out[-1].get("tool_calls"):
        raise BadRequest(f"message {i} is a tool result, but no assistant tool call comes "
                         "before it: send the assistant message with its tool_calls first")
    call_id = message.get("tool_call_id")
    if call_id is not None and call_ids and call_id not in call_ids:
        raise BadRequest(f"message {i} answers tool call {call_id!r}, which the assistant "
                         "message before it did not make")


def _assistant_text(message: dict, calls: list, i: int) -> str:
    text = _text(message.get("content"), i).strip()
    lines = [text] if text else []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(f"message {i}: each tool call needs function.name and "
                             "function.arguments")
        lines.append(render_call(fn["name"], fn.get("arguments") or "{}"))
    return "\n".join(lines)


def _text(content: Any, i: int) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and p.get("type") == "text")
    if isinstance(content, (dict, int, float, bool)):
        return json.dumps(content, ensure_ascii=False)  # Ollama tools may return objects
    raise BadRequest(f"message {i}: content must be text or a list of parts")


def prepend_text(text: str, content: Any) -> str | list:
    """Text in front of a message's content. In a content list it joins the first text part:
    the template trims each part, which would eat the newline between them."""
    if content is None or isinstance(content, str):
        return text + (content or "")
    parts = list(content)
    if parts and isinstance(parts[0], dict) and parts[0].get("type") == "text":
        return [{**parts[0], "text": text + parts[0].get("text", "")}, *parts[1:]]
    return [{"type": "text", "text": text}, *parts]


# ---- calls in a reply ---------------------------------------------------------------------------

def new_call_id() -> str:
    """A unique call id in OpenAI's style."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: `arguments` decoded, `arguments_json` exactly as written."""

    id: str
    name: str
    arguments: dict
    arguments_json: str

    def openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments_json}}

    def ollama(self) -> dict:
        return {"function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


@dataclass(frozen=True)
class CallEnd:
    index: int
    call: ToolCall


Event = ContentDelta | CallStart | ArgumentsDelta | CallEnd


@dataclass(frozen=True)
class Reply:
    content: str
    tool_calls: list[ToolCall]


class ReplyParser:
    """Turns a reply's text, delta by delta, into content and calls. Text stays content until
    a call opens (`{"name"`); from there the call syntax never reaches the content: a call is
    announced once its name is complete (CallStart), its arguments stream as they come
    (ArgumentsDelta), and CallEnd carries the finished ToolCall. Text that only looked like
    the start of a call goes back to the content. A call cut short (max tokens) is not a call.
    """

    def __init__(self, new_id: Callable[[], str] = new_call_id):
        self.new_id = new_id
        self.content = ""
        self.calls: list[ToolCall] = []
        self._buffer = ""  # text not yet decided
        self._gap = ""  # whitespace before a call opening: content again if it is no call
        self._state = "text"  # text | head | arguments | tail
        self._name = ""
        self._id = ""
        self._arguments = ""
        self._scan = _JsonScan()

    def feed(self, delta: str) -> list[Event]:
        self._buffer += delta
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        """The end of the reply: what was held back is content; a call whose arguments are
        complete is a call (even without its closing brace); one cut short is dropped."""
        events = self.feed("")
        if self._state == "text":
            self._to_content(self._buffer, events)
        elif self._state == "head":
            self._to_content(self._gap + CALL_OPENING + self._buffer, events)
        elif self._state == "tail":
            self._end_call(events)
        self._buffer, self._state = "", "text"
        return events

    @property
    def reply(self) -> Reply:
        return Reply(self.content, list(self.calls))

    # The states: each step consumes some of the buffer and returns whether to go on.
    def _step(self, events: list[Event]) -> bool:
        if self._state == "text":
            return self._text(events)
        if self._state == "head":
            return self._head(events)
        if self._state == "arguments":
            return self._args(events)
        return self._tail(events)

    def _text(self, events: list[Event]) -> bool:
        at = self._buffer.find(CALL_OPENING)
        if at >= 0:
            before = self._buffer[:at]
            self._to_content(before.rstrip(), events)
            self._gap = before[len(before.rstrip()):]
            self._buffer = self._buffer[at + len(CALL_OPENING):]
            self._state = "head"
            return True
        # Hold back what may still become a call opening, and trailing whitespace (a call's
        # text does not end the content with the blank before it).
        keep = _partial_suffix(self._buffer, CALL_OPENING)
        text = self._buffer[:len(self._buffer) - keep]
        stripped = text.rstrip()
        self._to_content(stripped, events)
        self._buffer = self._buffer[len(stripped):]
        return False

    def _head(self, events: list[Event]) -> bool:
        status, name, used = _parse_head(self._buffer)
        if status == "more":
            return False
        if status == "fail":  # not a call after all
            self._to_content(self._gap + CALL_OPENING + self._buffer[:1], events)
            self._buffer = self._buffer[1:]
            self._state = "text"
            return True
        self._name, self._id = name, self.new_id()
        self._buffer = self._buffer[used:]
        self._arguments, self._scan = "", _JsonScan()
        self._state = "arguments"
        events.append(CallStart(len(self.calls), self._id, name))
        return True

    def _args(self, events: list[Event]) -> bool:
        end = self._scan.feed(self._buffer)
        piece = self._buffer if end is None else self._buffer[:end]
        if not self._arguments:
            piece = piece.lstrip()
        if piece:
            self._arguments += piece
            events.append(ArgumentsDelta(len(self.calls), piece))
        self._buffer = "" if end is None else self._buffer[end:]
        if end is None:
            return False
        self._state = "tail"
        return True

    def _tail(self, events: list[Event]) -> bool:
        rest = self._buffer.lstrip()
        if not rest:
            return False
        self._buffer = rest[1:] if rest[0] == "}" else rest
        self._end_call(events)
        return True

    def _end_call(self, events: list[Event]) -> None:
        try:
            arguments = json.loads(self._arguments)
        except json.JSONDecodeError:
            arguments = None
        if isinstance(arguments, dict):
            call = ToolCall(self._id, self._name, arguments, self._arguments)
            events.append(CallEnd(len(self.calls), call))
            self.calls.append(call)
        self._state = "text"  # whitespace between calls never reaches the content

    def _to_content(self, text: str, events: list[Event]) -> None:
        if text:
            self.content += text
            events.append(ContentDelta(text))


def parse_reply(text: str, new_id: Callable[[], str] = new_call_id) -> Reply:
    """A finished reply's content and calls, as the streaming parser reads them."""
    parser = ReplyParser(new_id)
    parser.feed(text)
    parser.finish()
    return parser.reply


def _partial_suffix(text: str, word: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `word`."""
    for n in range(min(len(word) - 1, len(text)), 0, -1):
        if text.endswith(word[:n]):
            return n
    return 0


_WS = " \t\r\n"


def _parse_head(buf: str) -> tuple[str, str, int]:
    """After `{"name"`: `: "NAME", "parameters": ` (any JSON whitespace). Returns ("ok", name,
    characters used), ("more", "", 0) while it may still come, or ("fail", "", 0)."""
    i = _skip(buf, 0)
    for expected in (":", '"'):
        if i >= len(buf):
            return "more", "", 0
        if buf[i] != expected:
            return "fail", "", 0
        i = _skip(buf, i + 1) if expected == ":" else i + 1
    start = i - 1
    while True:  # the name: a JSON string
        if i >= len(buf):
            return "more", "", 0
        if buf[i] == "\\":
            i += 2
            continue
        if buf[i] == '"':
            break
        if buf[i] == "\n":
            return "fail", "", 0
        i += 1
    try:
        name = json.loads(buf[start:i + 1])
    except json.JSONDecodeError:
        return "fail", "", 0
    i = _skip(buf, i + 1)
    for literal in (",", '"parameters"', ":"):
        i = _skip(buf, i)
        got = buf[i:i + len(literal)]
        if got != literal[:len(got)]:
            return "fail", "", 0
        if len(got) < len(literal):
            return "more", "", 0
        i += len(literal)
    i = _skip(buf, i)
    if i >= len(buf):
        return "more", "", 0
    return ("ok", name, i) if buf[i] == "{" else ("fail", "", 0)


def _skip(buf: str, i: int) -> int:
    while i < len(buf) and buf[i] in _WS:
        i += 1
    return i


class _JsonScan:
    """Finds where a JSON value ends, fed piece by piece (objects, arrays, strings nest)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.started = False

    def feed(self, text: str) -> int | None:
        """The index in `text` just after the value's end, or None if it goes on."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                continue
            if ch in _WS and not self.started:
                continue
            self.started = True
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return i + 1
        return None
