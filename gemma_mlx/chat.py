"""Conversations: from messages to prompt tokens, and replies streamed back.

`generate` and `stream` are the one-message conversation (or a raw completion for base models).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .engine import Chunk, SamplingSettings, stream_tokens
from .errors import BadRequest
from .loading import Model
from .prompt import render


def prompt_ids(model: Model, prompt: str, system: str | None = None,
               raw: bool | None = None) -> list[int]:
    """Token ids for one user message; `raw` completes the text as it is (base models).
    `raw=None` chooses raw exactly when the model ships no chat template."""
    if not prompt.strip():
        raise BadRequest("the prompt is empty: give some text")
    if raw is None:
        raw = not model.has_chat_template
    tokenizer = model.tokenizer
    if raw:
        text = f"{system}\n\n{prompt}" if system else prompt
        return tokenizer.encode(text)
    messages = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": prompt})
    return tokenizer.encode(render(messages), add_special_tokens=False)


def stream(model: Model, prompt: str, *, system: str | None = None, raw: bool | None = None,
           should_stop: Callable[[], bool] = lambda: False, **sampling: Any) -> Iterator[Chunk]:
    """Stream the reply to one message: chunks with text, token and running stats."""
    settings = SamplingSettings(**sampling)
    settings.validate()
    ids = prompt_ids(model, prompt, system, raw)
    yield from stream_tokens(model, ids, settings, should_stop=should_stop)


def generate(model: Model, prompt: str, **kwargs: Any) -> str:
    """The whole reply to one message, as text."""
    return "".join(chunk.text for chunk in stream(model, prompt, **kwargs))
