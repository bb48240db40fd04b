"""The Gemma 3 turn format, rendered in Python exactly as the official chat template renders it.

Messages are dicts as in transformers: {"role": "system"|"user"|"assistant", "content": str or
[{"type": "text", "text": ...}, {"type": "image"}]}. A leading system message is folded into the
first user turn; every image becomes `<start_of_image>`, which the processor then expands into
the 256 soft tokens framed by blank lines.

`build_prompt` is what the library's Chat and the server both use: messages whose image items
carry their `Attachment` become the token ids plus the pictures of their image blocks, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRequest
from .images import pan_and_scan

BOS = "<bos>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
START_OF_IMAGE = "<start_of_image>"
END_OF_IMAGE = "<end_of_image>"
GENERATION_PROMPT = f"{START_OF_TURN}model\n"

# The chat template of Google's instruction-tuned Gemma 3 checkpoints (tokenizer_config.json),
# supplied to tokenizers that come without one (GGUF imports).
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""


def render(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
           bos: bool = True) -> str:
    """The template's output for these messages (images as `<start_of_image>`)."""
    messages = list(messages)
    prefix = ""
    if messages and messages[0]["role"] == "system":
        prefix = _system_text(messages[0]["content"]) + "\n\n"
        messages = messages[1:]
    parts = [BOS] if bos else []
    for i, message in enumerate(messages):
        if (message["role"] == "user") != (i % 2 == 0):
            raise BadRequest("conversation roles must alternate user/assistant/user/...")
        parts.append(render_turn(message["role"], message["content"], prefix if i == 0 else ""))
    if add_generation_prompt:
        parts.append(GENERATION_PROMPT)
    return "".join(parts)


def render_turn(role: str, content: str | list, prefix: str = "") -> str:
    """One turn: `<start_of_turn>{role}\n{prefix}{content, trimmed}<end_of_turn>\n`."""
    role = "model" if role == "assistant" else role
    return f"{START_OF_TURN}{role}\n{prefix}{_content_text(content)}{END_OF_TURN}\n"


def pan_and_scan_text(n_crops: int) -> str:
    """What Gemma3Processor puts in place of one image that pan-and-scan cut into crops."""
    return (f"Here is the original image {START_OF_IMAGE} and here are some crops to help you "
            "see better " + " ".join([START_OF_IMAGE] * n_crops))


@dataclass(frozen=True)
class ImageTokens:
    """The ids that frame and fill one image block (from the model config)."""

    start: int
    end: int
    soft: int
    per_image: int


def encode(tokenizer: Any, text: str, image: ImageTokens | None = None) -> list[int]:
    """Token ids of rendered text, each `<start_of_image>` expanded into its image block.

    Equal to tokenizing the processor's expanded text at once: HF tokenizers split on special
    tokens before anything else, so the blank lines framing an image merge with the
    neighbouring text exactly as they do here. The soft token ids are inserted directly, since
    the 270M/1B vocabulary has no `<image_soft_token>` string."""
    pieces = text.split(START_OF_IMAGE)
    if len(pieces) > 1 and image is None:
        raise BadRequest("this model takes text only: it has no vision tower for images")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        before = "\n\n" if i > 0 else ""
        after = "\n\n" if i < len(pieces) - 1 else ""
        segment = before + piece + after
        if segment:
            ids += tokenizer.encode(segment, add_special_tokens=False)
        if after:
            ids += [image.start, *[image.soft] * image.per_image, image.end]
    return ids


def _system_text(content: str | list) -> str:
    return content if isinstance(content, str) else content[0]["text"]


def _content_text(content: str | list) -> str:
    if isinstance(content, str):
        return _jinja_trim(content)
    out = []
    for item in content:
        if item["type"] == "image":
            out.append(START_OF_IMAGE)
        elif item["type"] == "text":
            out.append(_jinja_trim(item["text"]))
    return "".join(out)


def _jinja_trim(s: str) -> str:
    """Jinja's `trim` filter is Python's str.strip()."""
    return s.strip()


@dataclass
class Picture:
    """What fills one image block: a picture (or a pan-and-scan crop of one), keyed by its
    content, so a cached block is known again by what it shows, not by where it came from."""

    key: str
    image: Any  # PIL.Image.Image


@dataclass
class Prompt:
    """Token ids and the pictures of their image blocks, in order."""

    ids: list[int]
    pictures: list[Picture] = field(default_factory=list)


def build_prompt(tokenizer: Any, messages: Sequence[dict[str, Any]], image: ImageTokens | None,
                 pan_and_scan_images: bool = False,
                 add_generation_prompt: bool = True) -> Prompt:
    """The ids of a conversation as the official template and processor give them.

    An image item is {"type": "image", "attachment": Attachment}; with `pan_and_scan_images`
    it becomes the processor's "Here is the original image ..." text and one block per crop.
    A model turn with "token_ids" is replayed as those exact tokens (what the model generated),
    so a KV cache that read them matches."""
    messages = list(messages)
    prefix = ""
    if messages and messages[0]["role"] == "system":
        prefix = _system_text(messages[0]["content"]) + "\n\n"
        messages = messages[1:]
    ids = [tokenizer.bos_token_id]
    pictures: list[Picture] = []
    for i, message in enumerate(messages):
        if (message["role"] == "user") != (i % 2 == 0):
            raise BadRequest("conversation roles must alternate user/assistant/user/...")
        if message["role"] == "assistant" and message.get("token_ids") is not None:
            ids += encode(tokenizer, f"{START_OF_TURN}model\n") + list(message["token_ids"])
            ids += encode(tokenizer, f"{END_OF_TURN}\n")
            continue
        content = message["content"]
        if not isinstance(content, str):
            content = [_image_item(item, pictures, pan_and_scan_images) for item in content]
        text = render_turn(message["role"], content, prefix if i == 0 else "")
        ids += encode(tokenizer, text, image)
    if add_generation_prompt:
        ids += encode(tokenizer, GENERATION_PROMPT)
    return Prompt(ids, pictures)


def _image_item(item: dict[str, Any], pictures: list[Picture], crops: bool) -> dict[str, Any]:
    """An image item as the template sees it, its pictures appended in prompt order."""
    if item["type"] != "image":
        return item
    attachment = item["attachment"]
    pictures.append(Picture(attachment.hash, attachment.image))
    if not crops:
        return {"type": "image"}
    parts = pan_and_scan(attachment.image)
    pictures += [Picture(f"{attachment.hash}/crop{j}", crop) for j, crop in enumerate(parts)]
    if not parts:
        return {"type": "image"}
    return {"type": "text", "text": pan_and_scan_text(len(parts))}
