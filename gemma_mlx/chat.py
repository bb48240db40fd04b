"""Conversations: history, image attachments, the context budget, and KV-cache reuse.

The conversation keeps the model's KV cache between turns and remembers which token ids it
holds. A new turn tokenizes the whole conversation, keeps the longest cached prefix and prefills
only the rest; undo/retry trim the cache where the caches allow it, and re-prefill otherwise.
Replies the model generated are replayed as the exact tokens it produced, so the cache matches.

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

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from .constrain import ReplyFormat
from .engine import Chunk, SamplingSettings, cache_offset, stream_tokens
from .errors import BadImage, BadRequest, ContextOverflow
from .images import ImageSource, image_hash, load_image, pan_and_scan, preprocess
from .loading import Model, check_kv_bits
from .prompt import (
    END_OF_TURN,
    GENERATION_PROMPT,
    START_OF_IMAGE,
    START_OF_TURN,
    ImageTokens,
    encode,
    pan_and_scan_text,
    render_turn,
)
from .speculative import DEFAULT_NUM_DRAFT_TOKENS, Draft, check_draft, check_num_draft_tokens
from .tools import (
    ContentDelta,
    ReplyParser,
    Tool,
    ToolCall,
    render_calls,
    render_definitions,
    render_results,
    result_text,
)

SAVE_FORMAT = 1
MIN_CONTEXT = 64  # tokens: below this no conversation fits
MAX_TOOL_ROUNDS = 8  # calls run and answered by Chat before it hands a call back
FEATURE_CACHE_SIZE = 32  # images whose vision features are kept (about 5 MB each on 4B)


@dataclass
class Attachment:
    """An image in a message: the decoded picture, its content hash and where it came from."""

    image: Any  # PIL.Image.Image, RGB
    hash: str
    source: str | None = None  # a path or URL, for saving; None for bytes / PIL input

    @classmethod
    def load(cls, source: ImageSource) -> Attachment:
        image = load_image(source)
        return cls(image, image_hash(image), _where(source))


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
    """A conversation with one model.

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
        check_kv_bits(kv_bits)
        self.pan_and_scan = pan_and_scan
        self.max_context = max_context
        self.kv_bits = kv_bits
        if draft_model is not None:
            check_draft(model, draft_model)
        check_num_draft_tokens(num_draft_tokens)
        self.draft_model = draft_model
        self.num_draft_tokens = num_draft_tokens
        self.messages: list[Message] = []
        self.notices: list[str] = []  # what the user should be told (e.g. turns dropped)
        self.first_turn = 0  # messages before this index no longer fit the context window
        self.context_limit = context_limit(model, max_context)
        self._streaming = False  # one turn at a time: the cache belongs to it
        self._cache: list | None = None
        self._cached_ids: list[int] = []
        # Content keys of the image blocks of the prompt in the cache, in order: every image
        # block has the same token ids, so a cached prefix must also have the same pictures.
        self._cached_pictures: list[str] = []
        self._features: dict[str, mx.array] = {}
        self._draft_cache: list | None = None  # the draft model's, and the ids it holds
        self._draft_ids: list[int] = []
        self.last_prefill_tokens = 0  # how many tokens the last turn actually prefilled
        self._prompted_tools: tuple[Tool, ...] = ()  # the last turn's tools in the prompt

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
        self._cache, self._cached_ids = None, []
        self._draft_cache, self._draft_ids = None, []

    @property
    def tokens_used(self) -> int:
        """Tokens of the conversation as the model sees it now."""
        if not self.visible_messages():
            return 0
        return len(self._conversation_ids(self.visible_messages(), generation_prompt=False))

    def prompt_tokens(self, text: str, images: Sequence[ImageSource] = ()) -> list[int]:
        """The token ids the model would see if this message were sent now (after dropping
        the oldest turns that would no longer fit)."""
        attachments = [self._attachment(source) for source in images]
        history = [*self.messages, Message("user", text, attachments)]
        return self._fit(history, self.settings)[1]

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
        if self._streaming:
            raise BadRequest("a reply is still streaming: read it to the end or close it "
                             "before the next turn")
        fmt = fmt or ReplyFormat()
        settings = replace(self.settings, **overrides)
        settings.validate()
        constraint = fmt.constraint(self.model)
        self._prompted_tools = fmt.prompted_tools
        first, ids = self._fit(history, settings)
        pictures = self._pictures(history[first:])
        reuse = self._reuse_cache(ids, [key for key, _ in pictures])
        new_ids = ids[reuse:]
        draft = self._draft(ids)
        features = self._image_features(pictures[self._image_blocks(ids[:reuse]):])
        self.last_prefill_tokens = len(new_ids)
        if first > self.first_turn:
            self.notices.append(f"the conversation outgrew the context window "
                                f"({self.context_limit} tokens): dropped the oldest "
                                f"{first - self.first_turn} message(s)")
        tokens: list[int] = []
        chunk = None
        stop_token = None
        parser = ReplyParser() if fmt.prompted_tools else None
        noted = False
        self._streaming = True
        chunks = stream_tokens(self.model, new_ids, settings, cache=self._cache,
                               should_stop=should_stop, image_features=features,
                               context_limit=self.context_limit, draft=draft,
                               constraint=constraint)
        try:
            for chunk in with_tool_calls(chunks, parser):
                tokens = chunk.tokens
                if chunk.finish_reason is not None and chunk.token is not None:
                    stop_token = chunk.token
                if chunk.notices and not noted:  # the engine's, once per reply
                    self.notices.extend(chunk.notices)
                    noted = True
                yield chunk
        except GeneratorExit:  # the caller stopped reading: a clean stop between tokens
            chunks.close()  # first: a draft then rolls the caches back to the tokens read
            self._finish(history, first, ids, tokens, "cancelled", keep_partial, parser)
            raise
        except BaseException:
            self._cache, self._cached_ids = None, []  # a half-run step: rebuild next turn
            self._draft_cache, self._draft_ids = None, []
            if tokens:
                self._finish(history, first, ids, tokens, "cancelled", keep_partial, parser,
                             cache_valid=False)
            raise
        finally:
            self._streaming = False
        self._finish(history, first, ids, tokens, chunk.finish_reason, keep_partial, parser,
                     stop_token=stop_token)

    def _finish(self, history: list[Message], first: int, ids: list[int], tokens: list[int],
                finish_reason: str | None, keep_partial: bool, parser: ReplyParser | None,
                cache_valid: bool = True, stop_token: int | None = None) -> None:
        stopped = finish_reason == "cancelled"
        if cache_valid and self._cache is not None:
            fed = ids + tokens + ([stop_token] if stop_token is not None else [])
            self._cached_ids = fed[:cache_offset(self._cache)]
            if self._draft_cache is not None:
                self._draft_ids = fed[:cache_offset(self._draft_cache)]
        if stopped and not keep_partial:
            return  # the conversation stays as it was before this turn
        text, calls = self.model.tokenizer.decode(tokens), []
        if parser is not None:  # the reply's content; its calls (those complete) apart
            parser.finish()
            text, calls = parser.content, list(parser.calls)
        self.messages = [*history, Message("assistant", text, token_ids=list(tokens),
                                           stopped=stopped, tool_calls=calls)]
        self.first_turn = first

    def _fit(self, history: list[Message], settings: SamplingSettings) -> tuple[int, list[int]]:
        """Drop the oldest turns (whole exchanges: a message, its replies, calls and results,
        images with them; the system prompt stays) until the prompt leaves room for a reply.
        Returns (first kept index, prompt ids)."""
        room = min(settings.max_tokens, self.context_limit // 4)
        first = self.first_turn
        starts = _exchanges(history)
        while True:
            ids = self._conversation_ids(history[first:])
            if len(ids) + room <= self.context_limit:
                return first, ids
            later = [i for i in starts if first < i]
            if not later:
                raise ContextOverflow(
                    f"this message needs {len(ids)} tokens but the context window holds "
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

    def _reuse_cache(self, ids: list[int], pictures: list[str]) -> int:
        """Keep the longest cached prefix of `ids` (at least one token must be new) that holds
        the same pictures (compared by content key at each image's `<start_of_image>`); trim
        the cache to it, or start a fresh cache if it cannot be trimmed. Returns its length."""
        if self._cache is None:
            self._cache, self._cached_ids = self.model.make_cache(self.kv_bits), []
        boi = self.model.config.boi_token_index
        common = block = 0
        for a, b in zip(self._cached_ids, ids, strict=False):
            if a != b:
                break
            if b == boi:
                cached = self._cached_pictures[block:block + 1]
                if cached != pictures[block:block + 1]:
                    break  # another picture in the same place: prefill from its block on
                block += 1
            common += 1
        common = min(common, len(ids) - 1)
        if not _trim(self._cache, len(self._cached_ids) - common):
            self._cache, common = self.model.make_cache(self.kv_bits), 0
        self._cached_ids, self._cached_pictures = ids[:common], list(pictures)
        return common

    def _draft(self, ids: list[int]) -> Draft | None:
        """The draft model's part of this turn: its cache, trimmed to the longest prefix of
        `ids` it holds (or fresh where it cannot be trimmed), and the ids it has yet to read.
        It sees no pictures, so the ids are all there is to compare."""
        if self.draft_model is None:
            return None
        if self._draft_cache is None:
            self._draft_cache, self._draft_ids = self.draft_model.make_cache(), []
        common = 0
        for a, b in zip(self._draft_ids, ids, strict=False):
            if a != b:
                break
            common += 1
        if not _trim(self._draft_cache, len(self._draft_ids) - common):
            self._draft_cache, common = self.draft_model.make_cache(), 0
        self._draft_ids = ids[:common]
        return Draft(self.draft_model, self._draft_cache, ids[common:], self.num_draft_tokens)

    # ---- tokens and images -------------------------------------------------------------

    def _conversation_ids(self, messages: Sequence[Message],
                          generation_prompt: bool = True) -> list[int]:
        """The prompt ids: turns alternate user/model; tool results (and a message sent with
        them) make one user turn; the first user turn starts with the system prompt and the
        tool definitions (tools.py)."""
        tokenizer = self.model.tokenizer
        ids = [tokenizer.bos_token_id]
        prefix = f"{self.system}\n\n" if self.system else ""
        if self._prompted_tools:
            prefix += render_definitions(self._prompted_tools)
        for i, turn in enumerate(_turns(messages)):
            role = turn[0].role
            if (role != "assistant") != (i % 2 == 0):
                raise BadRequest("conversation roles must alternate user/assistant/user/...")
            if role == "assistant":
                message = turn[0]
                if message.token_ids is not None:
                    ids += encode(tokenizer, f"{START_OF_TURN}model\n") + message.token_ids
                    ids += encode(tokenizer, f"{END_OF_TURN}\n")
                    continue
                text = "\n".join(t for t in (message.text.strip(),
                                             render_calls(message.tool_calls)) if t)
                ids += encode(tokenizer, render_turn("assistant", text))
                continue
            content = self._turn_content(turn)
            text = render_turn("user", content, prefix if i == 0 else "")
            ids += encode(tokenizer, text, self._image_tokens())
        if generation_prompt:
            ids += encode(tokenizer, GENERATION_PROMPT)
        return ids

    def _turn_content(self, turn: list[Message]) -> str | list:
        """A user turn: the tool results (tool_output blocks), then the message, if any."""
        results = [m.text for m in turn if m.role == "tool"]
        asked = [m for m in turn if m.role == "user"]
        if not results:
            return self._content(asked[0])
        head = render_results(results)
        if not asked:
            return head
        content = self._content(asked[0])
        if isinstance(content, str):
            return f"{head}\n\n{content}"
        return [{"type": "text", "text": head}, *content]

    def _content(self, message: Message) -> str | list:
        if not message.images:
            return message.text
        items: list[dict] = []
        for attachment in message.images:
            crops = self._crops(attachment)
            if crops:
                items.append({"type": "text", "text": pan_and_scan_text(len(crops))})
            else:
                items.append({"type": "image"})
        items.append({"type": "text", "text": message.text})
        return items

    def _image_tokens(self) -> ImageTokens | None:
        cfg = self.model.config
        if not cfg.has_vision:
            return None
        return ImageTokens(cfg.boi_token_index, cfg.eoi_token_index, cfg.image_token_index,
                           cfg.mm_tokens_per_image)

    def _attachment(self, source: ImageSource) -> Attachment:
        if not self.model.config.has_vision:
            raise BadImage(f"{self.model.name} takes text only: use a vision model "
                           "(4b, 12b, 27b) to send images")
        return Attachment.load(source)

    def _crops(self, attachment: Attachment) -> list:
        return pan_and_scan(attachment.image) if self.pan_and_scan else []

    def _image_blocks(self, ids: Sequence[int]) -> int:
        return sum(1 for t in ids if t == self.model.config.boi_token_index)

    def _pictures(self, messages: Sequence[Message]) -> list[tuple[str, Any]]:
        """(content key, image) of each image block of these messages, in prompt order: every
        picture, then its pan-and-scan crops."""
        pictures = []
        for message in messages:
            if message.role != "user":
                continue
            for attachment in message.images:
                pictures.append((attachment.hash, attachment.image))
                for j, crop in enumerate(self._crops(attachment)):
                    pictures.append((f"{attachment.hash}/crop{j}", crop))
        return pictures

    def _image_features(self, needed: Sequence[tuple[str, Any]]) -> mx.array | None:
        """Soft tokens [n_blocks, 256, hidden] for the image blocks not yet in the cache,
        each picture encoded once (features cached by content hash)."""
        if not needed:
            return None
        size = self.model.config.vision.image_size
        missing = list({key: img for key, img in needed if key not in self._features}.items())
        if missing:
            pixels = mx.array(np.stack([preprocess(img, size) for _, img in missing]))
            encoded = self.model.net.encode_images(pixels)
            mx.eval(encoded)
            for (key, _), features in zip(missing, encoded, strict=True):
                self._features[key] = features
        stacked = mx.stack([self._features[key] for key, _ in needed])
        for key, _ in needed:  # the least recently used go first, never this turn's
            self._features[key] = self._features.pop(key)
        while len(self._features) > FEATURE_CACHE_SIZE:
            self._features.pop(next(iter(self._features)))
        return stacked


# ---- turns and tool calls --------------------------------------------------------------------

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

def _trim(cache: list, excess: int) -> bool:
    """Drop the cache's last `excess` tokens; False where it cannot (a rotating cache that has
    wrapped: its old keys are gone), and the caller starts a fresh cache instead."""
    if excess <= 0:
        return True
    if not can_trim_prompt_cache(cache):
        return False
    trim_prompt_cache(cache, excess)
    return True


def _where(source: ImageSource) -> str | None:
    """What a saved chat refers to: a URL as given, a file by its absolute path (a relative
    one would be looked up beside the saved chat, not in the folder it was given from)."""
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return source
    if isinstance(source, (str, Path)):
        return str(Path(source).resolve())
    return None


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
    return chat._conversation_ids([Message("user", prompt)])


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

