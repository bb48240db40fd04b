"""Requests into prompts: the same ids the library's Chat and the CLI's --raw would use.

Both APIs normalise their messages to {"role", "content"} with content a string or a list of
{"type": "text", "text"} and {"type": "image", "attachment"} items, and their sampling options to
`SamplingSettings`. Rendering is stateless and runs on the handler's thread pool (tokenizing
and decoding images are not MLX work); it checks everything it can before a job is queued.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gemma_mlx.chat import image_tokens, prompt_ids
from gemma_mlx.engine import SamplingSettings
from gemma_mlx.errors import BadImage, BadRequest
from gemma_mlx.images import Attachment
from gemma_mlx.prompt import START_OF_IMAGE, Prompt, build_prompt

from .errors import APIError
from .registry import ServedModel
from .replies import continued
from .state import ServerState


def chat_prompt(served: ServedModel, messages: Sequence[dict[str, Any]],
                pan_and_scan: bool = False) -> Prompt:
    """The prompt of a conversation, rendered as the official chat template does."""
    model = served.model
    if not model.has_chat_template:
        raise APIError(400, f"{served.name} has no chat template (a base model): use "
                       "/v1/completions or /api/generate to complete raw text",
                       param="messages", code="no_chat_template")
    if not messages:
        raise APIError(400, "messages is empty: send at least one user message",
                       param="messages")
    turns = merge_system(messages)
    for turn in turns:
        _check_text(turn["content"])
    if any(_has_image(t["content"]) for t in turns) and not model.config.has_vision:
        raise BadImage(f"{served.name} takes text only: send images to a vision model "
                       "(4b, 12b, 27b)")
    if turns[-1]["role"] == "assistant":
        raise APIError(400, "the last message is the assistant's: end with a user message",
                       param="messages")
    return build_prompt(model.tokenizer, [_replayed(served, t) for t in turns],
                        image_tokens(model), pan_and_scan)


def _replayed(served: ServedModel, turn: dict[str, Any]) -> dict[str, Any]:
    """A reply the model gave, as the ids it generated (replies.py)."""
    if turn["role"] != "assistant" or not isinstance(turn["content"], str):
        return turn
    ids = served.replies.recall(turn["content"].strip())
    return turn if ids is None else {**turn, "token_ids": ids}


def completion_prompt(served: ServedModel, text: str, system: str | None = None) -> Prompt:
    """Raw text, tokenized as the CLI's --raw does (with <bos>); a prompt that continues one
    of the model's completions (its prompt and reply) keeps their ids (replies.py)."""
    if START_OF_IMAGE in text:
        raise BadRequest(f"the prompt contains the reserved token {START_OF_IMAGE}")
    tokenizer = served.model.tokenizer
    ids = continued(served.replies, raw_text(text, system),
                    lambda rest: tokenizer.encode(rest, add_special_tokens=False))
    return Prompt(ids if ids is not None else prompt_ids(served.model, text, system, raw=True))


def raw_text(text: str, system: str | None = None) -> str:
    """The text a raw prompt reads (as `prompt_ids` puts the system prompt in front)."""
    return (f"{system}\n\n" if system else "") + text


def merge_system(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Leading system messages become the one system prompt the template folds into the first
    user turn; a system message anywhere else has no place in Gemma's format."""
    turns = list(messages)
    system = []
    while turns and turns[0]["role"] == "system":
        system.append(_plain_text(turns.pop(0)["content"]))
    if any(t["role"] == "system" for t in turns):
        raise APIError(400, "a system message may only come first: Gemma 3 has no system turn "
                       "(it is folded into the first user message)", param="messages")
    if system:
        turns.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return turns


def sampling(served: ServedModel, prompt: Prompt, max_tokens: int | None,
             **options: Any) -> SamplingSettings:
    """Sampling settings with Gemma's defaults for what the request leaves out; max_tokens is
    capped by the context window (and defaults to all the room left)."""
    room = served.context_limit - len(prompt.ids)
    if room <= 0:
        raise APIError(400, f"the prompt is {len(prompt.ids)} tokens but the context window "
                       f"holds {served.context_limit}: shorten it", param="messages",
                       code="context_length_exceeded")
    given = {k: v for k, v in options.items() if v is not None}
    settings = SamplingSettings(**given, max_tokens=min(max_tokens or room, room))
    settings.validate()
    return settings


def load_images(state: ServerState, urls: Sequence[str]) -> list[Attachment]:
    """Fetch (data:, http(s) under the network rules) and decode, with the library's limits."""
    return [Attachment.load(state.fetcher.fetch(url)) for url in urls]


def _plain_text(content: str | list) -> str:
    if isinstance(content, str):
        return content
    if any(item["type"] != "text" for item in content):
        raise APIError(400, "a system message takes text only", param="messages")
    return "".join(item["text"] for item in content)


def _has_image(content: str | list) -> bool:
    return not isinstance(content, str) and any(i["type"] == "image" for i in content)


def _check_text(content: str | list) -> None:
    texts = [content] if isinstance(content, str) else [i.get("text", "") for i in content]
    if any(START_OF_IMAGE in t for t in texts):
        raise BadRequest(f"a message contains the reserved token {START_OF_IMAGE}: send "
                         "images as image parts instead")
