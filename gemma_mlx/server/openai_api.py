"""The OpenAI dialect: /v1/models, /v1/chat/completions and /v1/completions.

Requests are validated by pydantic models that allow unknown fields only to refuse them by name
(a 400, never silently ignored); the fields that only name a client's product (user, metadata,
store, ...) are accepted and ignored. Replies stream as server-sent events ending in [DONE].
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from gemma_mlx import __version__
from gemma_mlx.constrain import ReplyFormat, response_format
from gemma_mlx.tools import gemma_messages

from .errors import APIError, unsupported
from .jobs import Claim, Delta, Done, Failed, GenerationRequest, Job, TokenInfo
from .render import chat_prompt, completion_prompt, load_images, raw_text, sampling
from .responses import first_event, until_done
from .state import ServerState

router = APIRouter()

IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
           "prompt_cache_retention"}
FINGERPRINT = f"gemma-mlx-{__version__}"
SHUTDOWN_GRACE_S = 3.0


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extensions, as vLLM and llama.cpp take them
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def refuse_unsupported(self, *not_implemented: str) -> None:
        """400 for fields we do not implement, when they ask for something."""
        fields = [f for f in (self.model_extra or {}) if f not in IGNORED]
        fields += [f for f in not_implemented if getattr(self, f, None)]
        if self.n not in (None, 1):
            fields.append("n")
        if self.presence_penalty or self.frequency_penalty:
            fields += [f for f in ("presence_penalty", "frequency_penalty") if getattr(self, f)]
        if self.logit_bias:
            fields.append("logit_bias")
        if fields:
            raise unsupported(fields)
        if self.stream_options and not self.stream:
            raise APIError(400, "stream_options needs stream: true", param="stream_options")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def sampling_options(self) -> dict[str, Any]:
        return dict(temp=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty, seed=self.seed)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


def state_of(request: Request) -> ServerState:
    return request.app.state.gemma


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = state_of(request)
    entries = await run_in_threadpool(state.catalog.entries)
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": int(entry.modified), "owned_by": "gemma-mlx"}
        for entry in entries for name in entry.names]}


@router.get("/v1/models/{name:path}")
async def get_model(name: str, request: Request) -> dict:
    entry = await run_in_threadpool(state_of(request).check_model, name)
    return {"id": name, "object": "model", "created": int(entry.modified), "owned_by": "gemma-mlx"}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    state = state_of(request)
    request.state.body = body.model_dump(exclude_none=True)
    body.refuse_unsupported("functions", "function_call", "audio", "prediction",
                            "reasoning_effort", "web_search_options", "verbosity")
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    reply_format = await run_in_threadpool(
        lambda: ReplyFormat.of(body.tools, body.tool_choice, body.parallel_tool_calls is not False,
                               schema=response_format(body.response_format)))
    async with state.claim(body.model) as claim:
        served = claim.served
        messages = await run_in_threadpool(_messages, state, body.messages)
        messages = gemma_messages(messages, reply_format.prompted_tools, reply_format.choice)
        prompt = await run_in_threadpool(chat_prompt, served, messages,
                                         state.options.pan_and_scan)
        top = body.top_logprobs if body.logprobs else None
        settings = sampling(served, prompt, body.max_completion_tokens or body.max_tokens,
                            **body.sampling_options())
        generation = GenerationRequest(prompt, settings, body.stops,
                                       (top or 0) if body.logprobs else None,
                                       reply_format if reply_format.grammar is not None
                                       or reply_format.prompted_tools else None,
                                       remember="turn")
        return await _respond(state, claim, request, body, generation, Chat())


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = state_of(request)
    request.state.body = body.model_dump(exclude_none=True)
    body.refuse_unsupported("echo", "suffix")
    if body.best_of not in (None, 1):
        raise unsupported(["best_of"])
    text = body.prompt
    if isinstance(text, list):
        if len(text) != 1:
            raise APIError(400, "give one prompt per request (a list of several is not "
                           "supported)", param="prompt")
        text = text[0]
    async with state.claim(body.model) as claim:
        prompt = await run_in_threadpool(completion_prompt, claim.served, text)
        settings = sampling(claim.served, prompt, body.max_tokens or 16,
                            **body.sampling_options())
        generation = GenerationRequest(prompt, settings, body.stops, body.logprobs,
                                       remember="completion", raw_prompt=raw_text(text))
        return await _respond(state, claim, request, body, generation, Completion())


def _messages(state: ServerState, messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages with their images fetched and decoded (tool calls and results as they
    are, for tools.gemma_messages)."""
    out = []
    for i, message in enumerate(messages):
        extra = message.model_extra or {}
        content = message.content
        if content is None and not extra.get("tool_calls"):
            raise APIError(400, f"messages[{i}] has no content", param=f"messages[{i}]")
        if isinstance(content, list) and message.role != "tool":
            content = _parts(state, content, i)
        turn = {"role": message.role, "content": content}
        turn.update({k: extra[k] for k in ("tool_calls", "tool_call_id") if k in extra})
        out.append(turn)
    return out


def _parts(state: ServerState, parts: list[dict[str, Any]], i: int) -> list[dict[str, Any]]:
    items = []
    for part in parts:
        kind = part.get("type")
        if kind == "text":
            items.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise APIError(400, f"messages[{i}]: an image_url part needs image_url.url",
                               param=f"messages[{i}]")
            attachment, = load_images(state, [url])
            items.append({"type": "image", "attachment": attachment})
        else:
            raise APIError(400, f"messages[{i}]: content parts of type '{kind}' are not "
                           "supported (text and image_url are)", param=f"messages[{i}]")
    return items


async def _respond(state: ServerState, claim: Claim, request: Request, body: OpenAIRequest,
                   generation: GenerationRequest, shape: Chat | Completion):
    served = claim.served
    job = Job(generation, request.app.state.loop, claim)
    state.submit(job)
    request.state.job = job
    if not body.stream:
        text, tokens, done = await until_done(request, job, job.result())
        request.state.tokens = (done.prompt_tokens, done.completion_tokens)
        return shape.whole(served, text, tokens, done, generation.logprobs)
    first = await first_event(request, job)

    async def events() -> AsyncIterator[dict]:
        try:
            async for event in _chain(first, job):
                for frame in shape.frames(served, event, generation.logprobs, body.include_usage):
                    yield {"data": frame}
                if isinstance(event, Done):
                    request.state.tokens = (event.prompt_tokens, event.completion_tokens)
            yield {"data": "[DONE]"}
        finally:
            job.cancel()  # a client that went away stops the generation (no-op when done)

    # On shutdown the worker cancels the generation; the grace lets the stream end properly.
    return EventSourceResponse(events(), ping=15, shutdown_event=anyio.Event(),
                               shutdown_grace_period=SHUTDOWN_GRACE_S)


async def _chain(first, job: Job):
    yield first
    if isinstance(first, Delta):
        async for event in job.events():
            yield event


def _usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


def _finish(done: Done) -> str:
    if done.finish_reason in ("length", "tool_calls"):
        return done.finish_reason
    return "stop"


def _call_deltas(event: Delta) -> list[dict]:
    """OpenAI's streamed tool calls: per index, first the id and name, then the arguments."""
    out = []
    for call in event.calls:
        if call.name is not None:
            out.append({"index": call.index, "id": call.id, "type": "function",
                        "function": {"name": call.name, "arguments": ""}})
        else:
            out.append({"index": call.index, "function": {"arguments": call.arguments}})
    return out


def _token_logprob(info: TokenInfo, tokenizer: Any, top: int) -> dict:
    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {**entry(info.text, info.logprob),
            "top_logprobs": [entry(tokenizer.decode([t]), lp)
                             for t, lp in info.top_logprobs[:top]]}


def _message(text: str, done: Done) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if done.tool_calls:
        message["content"] = text or None
        message["tool_calls"] = [call.openai() for call in done.tool_calls]
    return message


class Chat:
    """chat.completion objects and chat.completion.chunk frames."""

    def __init__(self) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.started = False

    def _logprobs(self, served, tokens: list[TokenInfo], top: int | None):
        if top is None:
            return None
        tokenizer = served.model.tokenizer
        return {"content": [_token_logprob(t, tokenizer, top) for t in tokens], "refusal": None}

    def whole(self, served, text, tokens, done: Done, top) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": served.name, "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "finish_reason": _finish(done),
                             "message": _message(text, done),
                             "logprobs": self._logprobs(served, tokens, top)}],
                "usage": _usage(done)}

    def _chunk(self, served, choices: list, usage: dict | None, with_usage: bool) -> str:
        frame = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": served.name, "system_fingerprint": FINGERPRINT, "choices": choices}
        if with_usage:
            frame["usage"] = usage
        return json.dumps(frame)

    def frames(self, served, event, top, with_usage: bool) -> list[str]:
        if isinstance(event, Failed):
                return [json.dumps(event.error.openai())]
        frames = []
        if not self.started:
            self.started = True
            frames.append(self._chunk(served, [{"index": 0, "delta": {"role": "assistant",
                                                                      "content": ""},
                                               "logprobs": None, "finish_reason": None}],
                                      None, with_usage))
        if isinstance(event, Delta):
            delta: dict[str, Any] = {}
            if event.text or (event.tokens and not event.calls):
                delta["content"] = event.text
            if event.calls:
                delta["tool_calls"] = _call_deltas(event)
            if delta:
                frames.append(self._chunk(served, [{
                    "index": 0, "delta": delta,
                    "logprobs": self._logprobs(served, event.tokens, top),
                    "finish_reason": None}], None, with_usage))
            return frames
        frames.append(self._chunk(served, [{"index": 0, "delta": {}, "logprobs": None,
                                           "finish_reason": _finish(event)}], None, with_usage))
        if with_usage:
            frames.append(self._chunk(served, [], _usage(event), True))
        return frames


class Completion:
    """text_completion objects and frames."""

    def __init__(self) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.offset = 0

    def _logprobs(self, served, tokens: list[TokenInfo], top: int | None):
        if top is None:
            return None
        tokenizer = served.model.tokenizer
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t.text)
        return {"tokens": [t.text for t in tokens],
                "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{tokenizer.decode([i]): lp for i, lp in t.top_logprobs[:top]}
                                 for t in tokens] if top else None,
                "text_offset": offsets}

    def _object(self, served, choices: list, usage: dict | None = None) -> dict:
        obj = {"id": self.id, "object": "text_completion", "created": self.created,
               "model": served.name, "system_fingerprint": FINGERPRINT, "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return obj

    def whole(self, served, text, tokens, done: Done, top) -> dict:
        return self._object(served, [{"index": 0, "text": text, "finish_reason": _finish(done),
                                     "logprobs": self._logprobs(served, tokens, top)}],
                            _usage(done))

    def frames(self, served, event, top, with_usage: bool) -> list[str]:
        if isinstance(event, Failed):
            return [json.dumps(event.error.openai())]
        if isinstance(event, Delta):
            return [json.dumps(self._object(served, [{
                "index": 0, "text": event.text, "finish_reason": None,
                "logprobs": self._logprobs(served, event.tokens, top)}]))]
        frames = [json.dumps(self._object(served, [{"index": 0, "text": "",
                                                  "finish_reason": _finish(event),
                                                  "logprobs": None}]))]
        if with_usage:
            frames.append(json.dumps(self._object(served, [], _usage(event))))
        return frames
