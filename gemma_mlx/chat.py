"""Conversations: history, image attachments, the context budget, undo/retry, save/load.

A `Chat` is the messages plus a `Session` (session.py), which keeps the model's KV cache between
turns: a new turn renders the whole conversation, and the session prefills only what its cache
does not already hold; undo/retry trim the cache where the caches allow it, and re-prefill
otherwise. Replies the model generated are replayed as the exact tokens it produced, so the
cache matches.

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

from .engine import Chunk, SamplingSettings, stream_tokens
from .errors import BadImage, BadRequest, ContextOverflow
from .images import Attachment, ImageSource
from .loading import Model
from .prompt import START_OF_IMAGE, ImageTokens, Prompt, build_prompt
from .session import Session
from .speculative import DEFAULT_NUM_DRAFT_TOKENS, Draft, check_draft, check_num_draft_tokens

__all__ = ["Attachment", "Chat", "Message", "generate", "prompt_ids", "stream"]

SAVE_FORMAT = 1
MIN_CONTEXT = 64  # tokens: below this no conversation fits


@dataclass
class Message:
    role: str  # "user" or "assistant"
    text: str
    images: list[Attachment] = field(default_factory=list)
    token_ids: list[int] | None = None  # a reply's own tokens, replayed exactly
    stopped: bool = False  # a reply cut short (Esc / Ctrl-C / should_stop)


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

    def send(self, text: str, images: Sequence[ImageSource] = (), **overrides: Any) -> str:
        """Send a message and return the whole reply."""
        return "".join(chunk.text for chunk in self.stream(text, images, **overrides))

    def stream(self, text: str, images: Sequence[ImageSource] = (),
               should_stop: Callable[[], bool] = lambda: False, keep_partial: bool = True,
               **overrides: Any) -> Iterator[Chunk]:
        """Send a message and stream the reply. If it fails before the reply starts, the
        conversation is exactly as it was; a reply cut short is kept, marked `stopped`
        (or dropped, with `keep_partial=False`)."""
        if not text.strip() and not images:
            raise BadRequest("the message is empty: type something or attach an image")
        if START_OF_IMAGE in text:
            raise BadRequest(f"the message contains the reserved token {START_OF_IMAGE}: "
                             "attach images with images=[...] (or /image) instead")
        attachments = [self._attachment(source) for source in images]
        history = [*self.messages, Message("user", text, attachments)]
        yield from self._reply(history, should_stop, keep_partial, overrides)

    def retry(self, should_stop: Callable[[], bool] = lambda: False, keep_partial: bool = True,
              **overrides: Any) -> Iterator[Chunk]:
        """Generate the last reply again (a new sample)."""
        if not self.messages or self.messages[-1].role != "assistant":
            raise BadRequest("there is no reply to retry yet")
        yield from self._reply(self.messages[:-1], should_stop, keep_partial, overrides)

    def undo(self) -> Message | None:
        """Remove the last exchange (the reply and the message it answered); return the
        message, so a caller can put its text back in the input box."""
        if not self.messages:
            return None
        if self.messages[-1].role == "assistant":
            self.messages.pop()
        user = self.messages.pop() if self.messages else None
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
               keep_partial: bool, overrides: dict) -> Iterator[Chunk]:
        if self.session.busy:
            raise BadRequest("a reply is still streaming: read it to the end or close it "
                             "before the next turn")
        settings = replace(self.settings, **overrides)
        settings.validate()
        first, prompt = self._fit(history, settings)
        if first > self.first_turn:
            self.notices.append(f"the conversation outgrew the context window "
                                f"({self.context_limit} tokens): dropped the oldest "
                                f"{first - self.first_turn} message(s)")
        tokens: list[int] = []
        chunk = None
        chunks = self.session.stream(prompt, settings, should_stop=should_stop,
                                     context_limit=self.context_limit)
        try:
            for chunk in chunks:
                tokens = chunk.tokens
                yield chunk
        except GeneratorExit:  # the caller stopped reading: a clean stop between tokens
            chunks.close()  # first: the session then records what its caches hold
            self._finish(history, first, tokens, "cancelled", keep_partial)
            raise
        except BaseException:
            if tokens:  # the session dropped its cache; the words shown are kept
                self._finish(history, first, tokens, "cancelled", keep_partial)
            raise
        self._finish(history, first, tokens, chunk.finish_reason, keep_partial)

    def _finish(self, history: list[Message], first: int, tokens: list[int],
                finish_reason: str | None, keep_partial: bool) -> None:
        stopped = finish_reason == "cancelled"
        if stopped and not keep_partial:
            return  # the conversation stays as it was before this turn
        text = self.model.tokenizer.decode(tokens)
        self.messages = [*history, Message("assistant", text, token_ids=list(tokens),
                                           stopped=stopped)]
        self.first_turn = first

    def _fit(self, history: list[Message], settings: SamplingSettings) -> tuple[int, Prompt]:
        """Drop the oldest turns (whole exchanges, images with them; the system prompt stays)
        until the prompt leaves room for a reply. Returns (first kept index, the prompt)."""
        room = min(settings.max_tokens, self.context_limit // 4)
        first = self.first_turn
        while True:
            prompt = self._prompt(history[first:])
            if len(prompt.ids) + room <= self.context_limit:
                return first, prompt
            if first + 2 >= len(history):
                raise ContextOverflow(
                    f"this message needs {len(prompt.ids)} tokens but the context window holds "
                    f"{self.context_limit} (with {room} kept for the reply): shorten it"
                    + (", or raise --max-context" if self.context_limit < self.model.context_limit
                       else ""))
            first += 2

    # ---- tokens and images -------------------------------------------------------------

    def _prompt(self, messages: Sequence[Message], generation_prompt: bool = True) -> Prompt:
        turns = [{"role": "system", "content": self.system}] if self.system else []
        turns += [_turn(m) for m in messages]
        return build_prompt(self.model.tokenizer, turns, image_tokens(self.model),
                            self.pan_and_scan, generation_prompt)

    def _attachment(self, source: ImageSource) -> Attachment:
        if not self.model.config.has_vision:
            raise BadImage(f"{self.model.name} takes text only: use a vision model "
                           "(4b, 12b, 27b) to send images")
        return Attachment.load(source)


def _turn(message: Message) -> dict[str, Any]:
    """A message as `build_prompt` takes it: its pictures first, then its text."""
    turn: dict[str, Any] = {"role": message.role, "content": message.text}
    if message.images:
        turn["content"] = [*({"type": "image", "attachment": a} for a in message.images),
                           {"type": "text", "text": message.text}]
    if message.role == "assistant" and message.token_ids is not None:
        turn["token_ids"] = message.token_ids
    return turn


def image_tokens(model: Model) -> ImageTokens | None:
    """The ids of an image block of this model (None for text-only models)."""
    cfg = model.config
    if not cfg.has_vision:
        return None
    return ImageTokens(cfg.boi_token_index, cfg.eoi_token_index, cfg.image_token_index,
                       cfg.mm_tokens_per_image)


# ---- saving helpers -------------------------------------------------------------------------

def _message_to_json(message: Message, embed_images: bool) -> dict:
    data: dict[str, Any] = {"role": message.role, "text": message.text}
    if message.token_ids is not None:
        data["token_ids"] = message.token_ids
    if message.stopped:
        data["stopped"] = True
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
    return Message(data["role"], data["text"], images, data.get("token_ids"),
                   bool(data.get("stopped", False)))


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
               raw: bool | None = None) -> list[int]:
    """Token ids for one user message; `raw` completes the text as it is (base models).
    `raw=None` chooses raw exactly when the model ships no chat template."""
    if not prompt.strip():
        raise BadRequest("the prompt is empty: give some text")
    if raw is None:
        raw = not model.has_chat_template
    if raw:
        text = f"{system}\n\n{prompt}" if system else prompt
        return model.tokenizer.encode(text)
    # Not `prompt_tokens`: the engine fits a one-shot reply into whatever room is left.
    return Chat(model, system=system)._prompt([Message("user", prompt)]).ids


def stream(model: Model, prompt: str, *, system: str | None = None, raw: bool | None = None,
           images: Sequence[ImageSource] = (), pan_and_scan: bool = False,
           max_context: int | None = None, kv_bits: int | None = None,
           draft_model: Model | None = None, num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
           should_stop: Callable[[], bool] = lambda: False, **sampling: Any) -> Iterator[Chunk]:
    """Stream the reply to one message (with images, if any): chunks with text, token and
    running stats. `max_context` and `kv_bits` bound the KV cache, and `draft_model` drafts
    for speculative decoding, as in `Chat`."""
    settings = SamplingSettings(**sampling)
    settings.validate()
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
        yield from chat.stream(prompt, images, should_stop=should_stop)
        return
    ids = prompt_ids(model, prompt, system, raw)
    draft = Draft(draft_model, prompt=ids, num_draft_tokens=num_draft_tokens) \
        if draft_model is not None else None
    yield from stream_tokens(model, ids, settings, cache=model.make_cache(kv_bits),
                             should_stop=should_stop, context_limit=limit, draft=draft)


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

