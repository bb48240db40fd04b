"""One request as the worker runs it, whatever API it came from, and what comes back.

A handler renders its request into a `GenerationRequest` (ids, pictures, sampling, stop strings,
logprobs), submits a `Job`, and reads its events: `Delta`s of text, then one `Done` or `Failed`.
The worker fills the job's queue from its own thread; the handler reads it on the event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from gemma_mlx.constrain import ReplyFormat
from gemma_mlx.engine import SamplingSettings
from gemma_mlx.prompt import Prompt
from gemma_mlx.tools import ToolCall

from .errors import APIError


@dataclass
class GenerationRequest:
    prompt: Prompt
    settings: SamplingSettings
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: also the n likeliest
    reply_format: ReplyFormat | None = None  # tools (calls parsed and constrained) or a schema
    # How the reply's ids are remembered (replies.py): as a chat turn ("turn": by its text, as
    # the template trims it), or as the continuation of `raw_prompt` ("completion").
    remember: str | None = None
    raw_prompt: str = ""

    @property
    def parses_calls(self) -> bool:
        return self.reply_format is not None and bool(self.reply_format.prompted_tools)


@dataclass
class TokenInfo:
    token: int
    text: str  # the token's own text
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CallDelta:
    """Part of a tool call as it streams: first its id and name, then argument fragments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Delta:
    text: str
    tokens: list[TokenInfo] = field(default_factory=list)
    calls: list[CallDelta] = field(default_factory=list)


@dataclass
class Done:
    finish_reason: str  # stop, length or cancelled
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    prompt_seconds: float
    decode_seconds: float
    text: str = ""  # the whole reply's content (without its calls)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # the generated ids (not the stop token)


@dataclass
class Failed:
    error: APIError


Event = Delta | Done | Failed


class Claim:
    """A request's hold on a loaded model (see registry.py): while any is held the model
    stays loaded. The handler takes it; once the request's job is submitted, the job lets it
    go when it ends, else the handler does (its `async with`)."""

    def __init__(self, served: Any, release: Callable[[], None]):
        self.served = served
        self._release = release
        self._released = False
        self._lock = threading.Lock()
        self.handed_over = False  # to a job

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._release()


class Job:
    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop,
                 claim: Claim):
        self.request = request
        self.claim = claim
        self.served = claim.served
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.on_end: Callable[[], None] = lambda: None  # the worker's count of open jobs

    def cancel(self) -> None:
        """The client went away: stop at the next token (or never start)."""
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        """From the worker thread. The last event lets the model go."""
        if not isinstance(event, Delta):
            self.claim.release()
            end, self.on_end = self.on_end, lambda: None  # once
            end()
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            yield event
            if not isinstance(event, Delta):
                return

    async def result(self) -> tuple[str, list[TokenInfo], Done]:
        """The whole reply (for a request that does not stream): its content, tokens and end
        (with its tool calls)."""
        tokens = []
        async for event in self.events():
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Delta):
                tokens += event.tokens
            else:
                return event.text, tokens, event
        raise APIError(500, "the generation ended without a result")
