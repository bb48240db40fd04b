"""Conversations: history, image attachments, the context budget, undo/retry, save/load.

A `Chat` is the messages plus a `Session` (session.py), which keeps the model's KV cache between
turns: a new turn renders the whole conversation, and the session prefills only what its cache
does not already hold; undo/retry trim the cache where the caches allow it, and re-prefill
otherwise. Replies the model generated are replayed as the exact tokens it produced, so the
cache matches.

With tools (tools.py) a reply may call them; Chat runs Python functions itself and answers
with their results (tool messages, which make the next user turn), round after round.

`generate` and `stream` are the one-message conversation (or a raw completion for base models).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .constrain import ReplyFormat
from .engine import Chunk, SamplingSettings, stream_tokens
from .errors import BadImage, BadRequest, ContextOverflow
from .images import Attachment, ImageSource
from .loading import Model
from .prompt import START_OF_IMAGE, ImageTokens, Prompt, build_prompt
from .session import Session
from .speculative import DEFAULT_NUM_DRAFT_TOKENS, Draft, check_draft, check_num_draft_tokens
from .tools import (
    ContentDelta,
    ReplyParser,
    Tool,
    ToolCall,
    prepend_text,
    render_calls,
    render_definitions,
    render_results,
    result_text,
)

__all__ = ["Attachment", "Chat", "Message", "generate", "prompt_ids", "stream"]

SAVE_FORMAT = 1
MIN_CONTEXT = 64  # tokens: below this no conversation fits
MAX_TOOL_ROUNDS = 8  # calls run and answered by Chat before it hands a call back


@dataclass
class Message:
    role: str  # "user", "assistant" or "tool" (a call's result: part of the next user turn)
    text: str  # a reply's content, without its calls
    images: list[Attachment] = field(default_factory=list)
    token_ids: list[int] | None = None  # a reply's own tokens, replayed exactly
    stopped: bool = False  # a reply cut short (Esc / Ctrl-C / should_stop)
    tool_calls: list[ToolCall] = field(default_factory=list)  # the calls a reply made
    tool_call_id: str | None = None  # a result: the call it answers
    name: str | None = None  # a result: the tool that made it


class Chat:
    """A conversation with one model: the messages, and a `Session` (its KV cache).

        chat = Chat(model, system="Be brief.")
        print(chat.send("What is in this picture?", images=["photo.jpg"]))
        for chunk in chat.stream("And the colours?"):
            print(chunk.text, end="")
    """

    def __init__(self, model: Model, system: str | None = None, max_context: int | None = None,
                 pan_and_scan: bool = False, kv_bits: int | None = None,
                 draft_model: Model | None = None,
                 num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS, **sampling: Any):
        """`max_context` bounds the tokens the model sees (the oldest turns go beyond it) and so
        the KV cache's memory; `kv_bits` 4 or 8 stores the growing part of the cache quantized.
        A `draft_model` (a small Gemma 3: 270m, 1b) drafts `num_draft_tokens` at a time for
        speculative decoding (the replies stay the model's own)."""
        self.model = model
        self.system = system
        self.settings = SamplingSettings(**sampling)
        self.settings.validate()
        self.pan_and_scan = pan_and_scan
        self.max_context = max_context
        self.session = Session(model, kv_bits, draft_model, num_draft_tokens)
        self.messages: list[Message] = []
        self.notices: list[str] = []  # what the user should be told (e.g. turns dropped)
        self.first_turn = 0  # messages before this index no longer fit the context window
        self.context_limit = context_limit(model, max_context)
        self._prompted_tools: tuple[Tool, ...] = ()  # the last turn's tools in the prompt

    @property
    def kv_bits(self) -> int | None:
        return self.session.kv_bits

    @property
    def draft_model(self) -> Model | None:
        return self.session.draft_model

    @property
    def num_draft_tokens(self) -> int:
        return self.session.num_draft_tokens

    # ---- the public conversation --------------------------------------------------------

    def send(self, text: str = "", images: Sequence[ImageSource] = (), **options: Any) -> str:
        """Send a message and return the whole reply (its content: see `messages[-1]` for the
        calls of a reply that calls tools). Takes `stream`'s options."""
        return "".join(chunk.text for chunk in self.stream(text, images, **options))

    def stream(self, text: str = "", images: Sequence[ImageSource] = (),
               should_stop: Callable[[], bool] = lambda: False, keep_partial: bool = True, *,
               tools: Sequence[Tool | dict | Callable] | None = None,
               tool_choice: str | dict | None = None, parallel_tool_calls: bool = True,
               json_schema: dict | str | None = None,
               tool_results: dict[str, Any] | Sequence[tuple[str, Any]] | None = None,
               max_tool_rounds: int = MAX_TOOL_ROUNDS,
               approve: Callable[[ToolCall], bool] | None = None,
               **overrides: Any) -> Iterator[Chunk]:
        """Send a message and stream the reply. If it fails before the reply starts, the
        conversation is exactly as it was; a reply cut short is kept, marked `stopped`
        (or dropped, with `keep_partial=False`).

        `tools` (Python functions or OpenAI-style dicts) go into the prompt and a reply may call
        them (`tool_choice`: "auto", "required", "none" or a tool's name; the calls always
        parse and match their schemas); its last chunk and its message carry `tool_calls`.
        When the called tools are Python functions, Chat runs them (each after `approve(call)`,
        if given, says yes) and answers with their results, for at most `max_tool_rounds`
        rounds, streaming every reply until one answers in text (a "required" or named
        `tool_choice` holds for the first reply; those after results are "auto"). Otherwise,
        answer the calls with `tool_results` ({call id: result}) in the next `stream`/`send`.
        `json_schema` constrains the reply to that schema."""
        fmt = ReplyFormat.of(tools, tool_choice, parallel_tool_calls, json_schema)
        if max_tool_rounds < 0:
            raise BadRequest(f"max tool rounds must be 0 or more (got {max_tool_rounds})")
        results = self._results(tool_results)
        if not results and not text.strip() and not images:
            raise BadRequest("the message is empty: type something or attach an image")
        if START_OF_IMAGE in text:
            raise BadRequest(f"the message contains the reserved token {START_OF_IMAGE}: "
                             "attach images with images=[...] (or /image) instead")
        attachments = [self._attachment(source) for source in images]
        asked = [Message("user", text, attachments)] if text.strip() or images else []
        history = [*self.messages, *results, *asked]
        for rounds in range(max_tool_rounds + 1):
            chunk = None
            for chunk in self._reply(history, should_stop, keep_partial, overrides, fmt):
                yield chunk
            if chunk is None or not chunk.tool_calls or chunk.finish_reason == "cancelled":
                return
            if rounds == max_tool_rounds:
                if rounds:
                    self.notices.append(f"stopped running tools after {rounds} rounds: the "
                                        "last reply's calls are not answered yet")
                return
            answers = self._run_calls(chunk.tool_calls, fmt.tools, approve)
            if answers is None:  # a tool without a Python function: the caller answers
                return
            history = [*self.messages, *answers]
            fmt = fmt.follow_up()

    def retry(self, should_stop: Callable[[], bool] = lambda: False, keep_partial: bool = True,
              *, tools: Sequence[Tool | dict | Callable] | None = None,
              tool_choice: str | dict | None = None, parallel_tool_calls: bool = True,
              json_schema: dict | str | None = None, **overrides: Any) -> Iterator[Chunk]:
        """Generate the last reply again (a new sample); give the turn's tools or schema
        again to keep them."""
        if not self.messages or self.messages[-1].role != "assistant":
            raise BadRequest("there is no reply to retry yet")
        fmt = ReplyFormat.of(tools, tool_choice, parallel_tool_calls, json_schema)
        yield from self._reply(self.messages[:-1], should_stop, keep_partial, overrides, fmt)

    def undo(self) -> Message | None:
        """Remove the last exchange (the message you sent and everything after it: replies,
        tool calls and results); return the message, so a caller can put its text back in the
        input box."""
        if not self.messages:
            return None
        start = _exchanges(self.messages)[-1] if _exchanges(self.messages) else 0
        user = self.messages[start] if self.messages[start].role == "user" else None
        del self.messages[start:]
        self.first_turn = min(self.first_turn, len(self.messages))
        return user

    def clear(self) -> None:
        self.messages.clear()
        self.first_turn = 0
        self.session.reset()

    @property
    def tokens_used(self) -> int:
        """Tokens of the conversation as the model sees it now."""
        if not self.visible_messages():
            return 0
        return len(self._prompt(self.visible_messages(), generation_prompt=False).ids)

    def prompt_tokens(self, text: str, images: Sequence[ImageSource] = ()) -> list[int]:
        """The token ids the model would see if this message were sent now (after dropping
        the oldest turns that would no longer fit)."""
        attachments = [self._attachment(source) for source in images]
        history = [*self.messages, Message("user", text, attachments)]
        return self._fit(history, self.settings)[1].ids

    def visible_messages(self) -> list[Message]:
        return self.messages[self.first_turn:]

    # ---- saving ------------------------------------------------------------------------

    def save(self, path: str | Path, embed_images: bool = True) -> Path:
        """JSON with the messages and settings. Images are embedded (PNG, base64) or, with
        `embed_images=False`, referenced by path with their content hash."""
        path = Path(path)
        data = {
            "format": SAVE_FORMAT,
            "model": self.model.name,
            "system": self.system,
            "settings": self.settings.__dict__,
            "max_context": self.max_context,
            "kv_bits": self.kv_bits,
            "pan_and_scan": self.pan_and_scan,
            "first_turn": self.first_turn,
            "messages": [_message_to_json(m, embed_images) for m in self.messages],
        }
        path.write_text(json.dumps(data, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path, model: Model, **overrides: Any) -> Chat:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            options = {"max_context": data.get("max_context"), "kv_bits": data.get("kv_bits"),
                       "pan_and_scan": bool(data.get("pan_and_scan", False)),
                       **data.get("settings", {}), **overrides}
            chat = cls(model, system=data.get("system"), **options)
            chat.messages = [_message_from_json(m, path.parent) for m in data["messages"]]
            chat.first_turn = int(data.get("first_turn", 0))
        except FileNotFoundError as e:
            raise BadRequest(f"no saved chat at {path}: check the path") from e
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise BadRequest(f"{path} is not a saved gemma-mlx chat ({e})") from e
        if any(m.images for m in chat.messages) and not model.config.has_vision:
            raise BadImage(f"{path} has images but {model.name} takes text only: "
                           "open it with a vision model (4b, 12b, 27b)")
        return chat

    # ---- turns -------------------------------------------------------------------------

    def _reply(self, history: list[Message], should_stop: Callable[[], bool],
               keep_partial: bool, overrides: dict,
               fmt: ReplyFormat | None = None) -> Iterator[Chunk]:
        if self.session.busy:
            raise BadRequest("a reply is still streaming: read it to the end or close it "
                             "before the next turn")
        fmt = fmt or ReplyFormat()
        settings = replace(self.settings, **overrides)
        settings.validate()
        constraint = fmt.constraint(self.model)
        self._prompted_tools = fmt.prompted_tools
        first, prompt = self._fit(history, settings)
        if first > self.first_turn:
            self.notices.append(f"the conversation outgrew the context window "
                                f"({self.context_limit} tokens): dropped the oldest "
                                f"{first - self.first_turn} message(s)")
        tokens: list[int] = []
        chunk = None
        noted = False
        parser = ReplyParser() if fmt.prompted_tools else None
        engine = {"constraint": constraint} if constraint is not None else {}
        chunks = self.session.stream(prompt, settings, should_stop=should_stop,
                                     context_limit=self.context_limit, **engine)
        try:
            for chunk in with_tool_calls(chunks, parser):
                tokens = chunk.tokens
                if chunk.notices and not noted:  # the engine's, once per reply
                    self.notices.extend(chunk.notices)
                    noted = True
                yield chunk
        except GeneratorExit:  # the caller stopped reading: a clean stop between tokens
            chunks.close()  # first: the session then records what its caches hold
            self._finish(history, first, tokens, "cancelled", keep_partial, parser)
            raise
        except BaseException:
            if tokens:  # the session dropped its cache; the words shown are kept
                self._finish(history, first, tokens, "cancelled", keep_partial, parser)
            raise
        self._finish(history, first, tokens, chunk.finish_reason, keep_partial, parser)

    def _finish(self, history: list[Message], first: int, tokens: list[int],
                finish_reason: str | None, keep_partial: bool,
                parser: ReplyParser | None = None) -> None:
        stopped = finish_reason == "cancelled"
        if stopped and not keep_partial:
            return  # the conversation stays as it was before this turn
        text, calls = self.model.tokenizer.decode(tokens), []
        if parser is not None:  # the reply's content; its calls (those complete) apart
            parser.finish()
            text, calls = parser.content, list(parser.calls)
        self.messages = [*history, Message("assistant", text, token_ids=list(tokens),
                                           stopped=stopped, tool_calls=calls)]
        self.first_turn = first

    def _fit(self, history: list[Message], settings: SamplingSettings) -> tuple[int, Prompt]:
        """Drop the oldest turns (whole exchanges: a message, its replies, calls and results,
        images with them; the system prompt stays) until the prompt leaves room for a reply.
        Returns (first kept index, the prompt)."""
        room = min(settings.max_tokens, self.context_limit // 4)
        first = self.first_turn
        starts = _exchanges(history)
        while True:
            prompt = self._prompt(history[first:])
            if len(prompt.ids) + room <= self.context_limit:
                return first, prompt
            later = [i for i in starts if first < i]
            if not later:
                raise ContextOverflow(
                    f"this message needs {len(prompt.ids)} tokens but the context window holds "
                    f"{self.context_limit} (with {room} kept for the reply): shorten it"
                    + (", or raise --max-context" if self.context_limit < self.model.context_limit
                       else ""))
            first = later[0]

    def _results(self, tool_results: dict | Sequence[tuple[str, Any]] | None) -> list[Message]:
        """Results for the last reply's calls, by call id, as tool messages."""
        if not tool_results:
            return []
        pairs = list(tool_results.items() if isinstance(tool_results, dict) else tool_results)
        last = self.messages[-1] if self.messages else None
        calls = {c.id: c for c in last.tool_calls} if last and last.role == "assistant" else {}
        out = []
        for call_id, value in pairs:
            if call_id not in calls:
                raise BadRequest(f"no call {call_id!r} in the last reply to answer: answer its "
                                 f"tool_calls ({', '.join(calls) or 'none'})")
            out.append(Message("tool", result_text(value), tool_call_id=call_id,
                               name=calls[call_id].name))
        return out

    def _run_calls(self, calls: list[ToolCall], tools: Sequence[Tool],
                   approve: Callable[[ToolCall], bool] | None) -> list[Message] | None:
        """Run each call's Python function (when `approve` allows it) and return the results
        as tool messages; None when a called tool has no function (the caller answers)."""
        by_name = {t.name: t for t in tools}
        if any(by_name.get(c.name) is None or by_name[c.name].function is None for c in calls):
            return None
        out = []
        for call in calls:
            if approve is not None and not approve(call):
                value: Any = f"the user declined to run {call.name}"
            else:
                try:
                    value = by_name[call.name].function(**call.arguments)
                except Exception as e:  # the model sees the error and may try again
                    value = f"error: {type(e).__name__}: {e}"
            out.append(Message("tool", result_text(value), tool_call_id=call.id,
                               name=call.name))
        return out

    # ---- tokens and images -------------------------------------------------------------

    def _prompt(self, messages: Sequence[Message], generation_prompt: bool = True) -> Prompt:
        """The prompt: turns alternate user/model; tool results (and a message sent with them)
        make one user turn; the first user turn starts with the tool definitions (tools.py),
        after the system prompt."""
        turns = [_user_turn(group) if group[0].role != "assistant" else _turn(group[0])
                 for group in _turns(messages)]
        first = next((t for t in turns if t["role"] == "user"), None)
        if self._prompted_tools and first is not None:
            first["content"] = prepend_text(render_definitions(self._prompted_tools),
                                            first["content"])
        system = [{"role": "system", "content": self.system}] if self.system else []
        return build_prompt(self.model.tokenizer, system + turns, image_tokens(self.model),
                            self.pan_and_scan, generation_prompt)

    def _attachment(self, source: ImageSource) -> Attachment:
        if not self.model.config.has_vision:
            raise BadImage(f"{self.model.name} takes text only: use a vision model "
                           "(4b, 12b, 27b) to send images")
        return Attachment.load(source)


def _turn(message: Message) -> dict[str, Any]:
    """A message as `build_prompt` takes it: its pictures first, then its text (a reply: its
    text, then its calls, unless it is replayed as its own tokens)."""
    text = message.text
    if message.role == "assistant" and message.tool_calls:
        text = "\n".join(t for t in (text.strip(), render_calls(message.tool_calls)) if t)
    turn: dict[str, Any] = {"role": message.role, "content": text}
    if message.images:
        turn["content"] = [*({"type": "image", "attachment": a} for a in message.images),
                           {"type": "text", "text": message.text}]
    if message.role == "assistant" and message.token_ids is not None:
        turn["token_ids"] = message.token_ids
    return turn


def _user_turn(group: list[Message]) -> dict[str, Any]:
    """A user turn: the tool results (tool_output blocks), then the message sent, if any."""
    results = [m.text for m in group if m.role == "tool"]
    asked = [m for m in group if m.role == "user"]
    if not results:
        return _turn(asked[0])
    head = render_results(results)
    if not asked:
        return {"role": "user", "content": head}
    return {"role": "user", "content": prepend_text(head + "\n\n", _turn(asked[0])["content"])}


def image_tokens(model: Model) -> ImageTokens | None:
    """The ids of an image block of this model (None for text-only models)."""
    cfg = model.config
    if not cfg.has_vision:
        return None
    return ImageTokens(cfg.boi_token_index, cfg.eoi_token_index, cfg.image_token_index,
                       cfg.mm_tokens_per_image)


def _turns(messages: Sequence[Message]) -> list[list[Message]]:
    """Messages grouped into the prompt's turns: each reply alone; tool results with the
    message sent after them (if any) as one user turn."""
    turns: list[list[Message]] = []
    for message in messages:
        joins = (turns and message.role != "assistant" and turns[-1][0].role != "assistant"
                 and turns[-1][-1].role == "tool")
        if joins:
            turns[-1].append(message)
        else:
            turns.append([message])
    return turns


def _exchanges(messages: Sequence[Message]) -> list[int]:
    """Where each exchange starts: a message sent after a reply that made no calls (or first),
    so an exchange holds its replies, their calls and the results."""
    return [i for i, m in enumerate(messages) if m.role == "user" and
            (i == 0 or messages[i - 1].role == "assistant" and not messages[i - 1].tool_calls)]


def with_tool_calls(chunks: Iterator[Chunk], parser: ReplyParser | None) -> Iterator[Chunk]:
    """Chunks whose text is the reply's content only: the call syntax is parsed out as it
    streams (tools.py), and the last chunk carries the calls (finish_reason "tool_calls" when
    the reply ended on its own)."""
    if parser is None:
        yield from chunks
        return
    for chunk in chunks:
        events = parser.feed(chunk.text)
        if chunk.finish_reason is not None:
            events += parser.finish()
        text = "".join(e.text for e in events if isinstance(e, ContentDelta))
        if chunk.finish_reason is None:
            yield replace(chunk, text=text)
            continue
        reason = chunk.finish_reason
        if parser.calls and reason == "stop":
            reason = "tool_calls"
        yield replace(chunk, text=text, tool_calls=list(parser.calls), finish_reason=reason)


# ---- saving helpers -------------------------------------------------------------------------

def _message_to_json(message: Message, embed_images: bool) -> dict:
    data: dict[str, Any] = {"role": message.role, "text": message.text}
    if message.token_ids is not None:
        data["token_ids"] = message.token_ids
    if message.stopped:
        data["stopped"] = True
    if message.tool_calls:
        data["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments_json}
                              for c in message.tool_calls]
    if message.tool_call_id is not None:
        data["tool_call_id"], data["name"] = message.tool_call_id, message.name
    if message.images:
        data["images"] = [_image_to_json(a, embed_images) for a in message.images]
    return data


def _image_to_json(attachment: Attachment, embed: bool) -> dict:
    data = {"sha256": attachment.hash, "source": attachment.source}
    if embed or attachment.source is None:
        buffer = io.BytesIO()
        attachment.image.save(buffer, format="PNG")
        data["png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return data


def _message_from_json(data: dict, base: Path) -> Message:
    images = [_image_from_json(d, base) for d in data.get("images", [])]
    calls = [ToolCall(c["id"], c["name"], json.loads(c["arguments"]), c["arguments"])
             for c in data.get("tool_calls", [])]
    return Message(data["role"], data["text"], images, data.get("token_ids"),
                   bool(data.get("stopped", False)), calls, data.get("tool_call_id"),
                   data.get("name"))


def _image_from_json(data: dict, base: Path) -> Attachment:
    if "png" in data:
        attachment = Attachment.load(base64.b64decode(data["png"]))
        attachment.source = data.get("source")
    else:
        source = data["source"]
        path = Path(source) if "://" not in source else None
        if path is not None and not path.is_absolute():
            path = base / path
        attachment = Attachment.load(path or source)
    if attachment.hash != data["sha256"]:
        raise BadImage(f"the image {data.get('source')} changed since the chat was saved "
                       "(its content hash differs): restore it, or save chats with embedded "
                       "images")
    return attachment


# ---- one-message conversations --------------------------------------------------------------

def prompt_ids(model: Model, prompt: str, system: str | None = None,
               raw: bool | None = None, tools: Sequence[Tool] = ()) -> list[int]:
    """Token ids for one user message; `raw` completes the text as it is (base models).
    `raw=None` chooses raw exactly when the model ships no chat template. Tool definitions
    (tools.py) go in front of the message, after the system prompt."""
    if not prompt.strip():
        raise BadRequest("the prompt is empty: give some text")
    if raw is None:
        raw = not model.has_chat_template
    if raw:
        text = f"{system}\n\n" if system else ""
        text += render_definitions(tools) if tools else ""
        return model.tokenizer.encode(text + prompt)
    # Not `prompt_tokens`: the engine fits a one-shot reply into whatever room is left.
    chat = Chat(model, system=system)
    chat._prompted_tools = tuple(tools)
    return chat._prompt([Message("user", prompt)]).ids


def stream(model: Model, prompt: str, *, system: str | None = None, raw: bool | None = None,
           images: Sequence[ImageSource] = (), pan_and_scan: bool = False,
           max_context: int | None = None, kv_bits: int | None = None,
           draft_model: Model | None = None, num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
           should_stop: Callable[[], bool] = lambda: False,
           tools: Sequence[Tool | dict | Callable] | None = None,
           tool_choice: str | dict | None = None, parallel_tool_calls: bool = True,
           json_schema: dict | str | None = None, **sampling: Any) -> Iterator[Chunk]:
    """Stream the reply to one message (with images, if any): chunks with text, token and
    running stats. `max_context` and `kv_bits` bound the KV cache, and `draft_model` drafts
    for speculative decoding, as in `Chat`. With `tools` the reply may call them (the chunks'
    text is the content; the last chunk has `tool_calls`, which are not run here: see
    `Chat`); `json_schema` constrains the whole reply to a schema."""
    settings = SamplingSettings(**sampling)
    settings.validate()
    fmt = ReplyFormat.of(tools, tool_choice, parallel_tool_calls, json_schema)
    limit = context_limit(model, max_context)
    if draft_model is not None:
        check_draft(model, draft_model)
    check_num_draft_tokens(num_draft_tokens)
    if images:
        if raw:
            raise BadRequest("--raw completes plain text: images need the chat template")
        chat = Chat(model, system=system, pan_and_scan=pan_and_scan, max_context=max_context,
                    kv_bits=kv_bits, draft_model=draft_model,
                    num_draft_tokens=num_draft_tokens, **sampling)
        yield from chat.stream(prompt, images, should_stop=should_stop, tools=fmt.tools,
                               tool_choice=fmt.choice, parallel_tool_calls=fmt.parallel,
                               json_schema=None if fmt.tools else fmt.grammar,
                               max_tool_rounds=0)
        return
    ids = prompt_ids(model, prompt, system, raw, fmt.prompted_tools)
    draft = Draft(draft_model, prompt=ids, num_draft_tokens=num_draft_tokens) \
        if draft_model is not None else None
    chunks = stream_tokens(model, ids, settings, cache=model.make_cache(kv_bits),
                           should_stop=should_stop, context_limit=limit, draft=draft,
                           constraint=fmt.constraint(model))
    yield from with_tool_calls(chunks, ReplyParser() if fmt.prompted_tools else None)


def context_limit(model: Model, max_context: int | None) -> int:
    """The model's context window, or the smaller `max_context` a user set to bound memory."""
    if max_context is None:
        return model.context_limit
    if max_context < MIN_CONTEXT:
        raise BadRequest(f"max context must be at least {MIN_CONTEXT} tokens (got {max_context})")
    return min(model.context_limit, max_context)


def generate(model: Model, prompt: str, **kwargs: Any) -> str:
    """The whole reply to one message, as text."""
    return "".join(chunk.text for chunk in stream(model, prompt, **kwargs))

