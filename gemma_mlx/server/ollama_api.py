"""The Ollama dialect: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version.

Answers stream as NDJSON by default, as Ollama's do; the last object has `done: true`, the
counts and the durations in nanoseconds. Images come as base64 strings. `options` cover
temperature, top_p, top_k, min_p, num_predict, seed, stop, repeat_penalty and num_ctx (which
may only lower the server's window); the other options are refused by name.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from gemma_mlx import __version__
from gemma_mlx.constrain import ReplyFormat, ollama_format
from gemma_mlx.images import Attachment
from gemma_mlx.tools import gemma_messages

from .errors import APIError, unsupported
from .jobs import Done, Failed, GenerationRequest, Job, TokenInfo
from .render import chat_prompt, completion_prompt, sampling
from .responses import first_event, until_done
from .state import ServerState

router = APIRouter()

OPTIONS = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "seed": "seed", "repeat_penalty": "repetition_penalty"}
HANDLED = {*OPTIONS, "num_predict", "stop", "num_ctx"}
# Settings of llama.cpp's loader and threads: meaningless here, and harmless to accept.
IGNORED_OPTIONS = {"num_batch", "num_gpu", "main_gpu", "num_thread", "numa", "use_mmap",
                   "use_mlock", "low_vram", "f16_kv", "vocab_only", "num_keep"}


class OllamaRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool = True
    options: dict[str, Any] | None = None
    format: Any = None
    keep_alive: float | str | None = None  # one model stays loaded: accepted, nothing to do
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def refuse_unsupported(self, *not_implemented: str) -> None:
        fields = list(self.model_extra or {})
        fields += [f for f in not_implemented if getattr(self, f, None)]
        if self.think:
            fields.append("think")
        options = self.options or {}
        fields += [f"options.{k}" for k in options if k not in HANDLED | IGNORED_OPTIONS]
        if fields:
            raise unsupported(fields)

    def settings(self, state: ServerState, prompt) -> tuple[Any, list[str]]:
        options = self.options or {}
        num_ctx = options.get("num_ctx")
        if num_ctx is not None and len(prompt.ids) >= num_ctx:
            raise APIError(400, f"the prompt is {len(prompt.ids)} tokens, over num_ctx "
                           f"{num_ctx}: shorten it or raise num_ctx")
        predict = options.get("num_predict")
        if predict is not None and predict < 0:
            predict = None  # Ollama's -1 (and -2): until the context is full
        if num_ctx is not None:
            predict = min(predict or num_ctx, num_ctx - len(prompt.ids))
        given = {ours: options.get(theirs) for theirs, ours in OPTIONS.items()}
        stop = options.get("stop") or []
        return sampling(state, prompt, predict or None, **given), [stop] if isinstance(
            stop, str) else list(stop)

    @property
    def top(self) -> int | None:
        if not self.logprobs:
            return None
        if not 0 <= (self.top_logprobs or 0) <= 20:
            raise APIError(400, "top_logprobs must be between 0 and 20", param="top_logprobs")
        return self.top_logprobs or 0


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str = ""
    images: list[str] | None = None


class ChatRequest(OllamaRequest):
    messages: list[OllamaMessage] = []
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(OllamaRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool | None = None
    images: list[str] | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None


class ModelRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    name: str | None = None  # older clients


def state_of(request: Request) -> ServerState:
    return request.app.state.gemma


@router.get("/api/version")
async def version() -> dict:
    return {"version": __version__}


@router.get("/api/tags")
async def tags(request: Request) -> dict:
    state = state_of(request)
    return {"models": [_entry(state, name) for name in state.names[:1]]}


@router.get("/api/ps")
async def ps(request: Request) -> dict:
    state = state_of(request)
    entry = _entry(state, state.name)
    entry.update(expires_at=(datetime.now(timezone.utc) + timedelta(days=3650)).isoformat(),
                 size_vram=entry["size"], context_length=state.context_limit)
    return {"models": [entry]}


@router.post("/api/show")
async def show(body: ModelRequest, request: Request) -> dict:
    state = state_of(request)
    state.check_model(body.model or body.name)
    cfg = state.model.config
    return {
        "modelfile": f"FROM {state.name}\n", "parameters": "", "template": "{{ .Prompt }}",
        "license": "Gemma Terms of Use", "details": _details(state),
        "model_info": {"general.architecture": "gemma3",
                       "gemma3.context_length": state.context_limit,
                       "gemma3.embedding_length": cfg.text.hidden_size,
                       "gemma3.block_count": cfg.text.num_hidden_layers,
                       "gemma3.attention.head_count": cfg.text.num_attention_heads,
                       "gemma3.attention.head_count_kv": cfg.text.num_key_value_heads,
                       "gemma3.attention.sliding_window": cfg.text.sliding_window},
        "capabilities": _capabilities(state),
        "modified_at": _iso(state.created),
    }


@router.post("/api/chat")
async def chat(body: ChatRequest, request: Request):
    state = state_of(request)
    request.state.body = body.model_dump(exclude_none=True)
    body.refuse_unsupported()
    state.check_model(body.model)
    reply_format = await run_in_threadpool(
        lambda: ReplyFormat.of(body.tools, schema=ollama_format(body.format)))
    messages = await run_in_threadpool(_messages, body.messages)
    messages = gemma_messages(messages, reply_format.prompted_tools, reply_format.choice)
    prompt = await run_in_threadpool(chat_prompt, state, messages)
    settings, stops = body.settings(state, prompt)
    generation = GenerationRequest(prompt, settings, stops, body.top, _constrained(reply_format))
    return await _respond(state, request, body, generation, chat=True)


@router.post("/api/generate")
async def generate(body: GenerateRequest, request: Request):
    state = state_of(request)
    request.state.body = body.model_dump(exclude_none=True)
    body.refuse_unsupported("suffix", "template", "context")
    state.check_model(body.model)
    if not body.prompt and not body.images:  # Ollama's way to load a model: it is loaded
        return _final(state, {"response": ""}, "load", None)
    if body.raw or not state.model.has_chat_template:
        if body.images:
            raise APIError(400, "images need the chat template: leave out raw", param="raw")
        prompt = await run_in_threadpool(completion_prompt, state, body.prompt, body.system)
    else:
        turns = [{"role": "system", "content": body.system}] if body.system else []
        user = OllamaMessage(role="user", content=body.prompt, images=body.images)
        turns += await run_in_threadpool(_messages, [user])
        prompt = await run_in_threadpool(chat_prompt, state, turns)
    settings, stops = body.settings(state, prompt)
    reply_format = await run_in_threadpool(
        lambda: ReplyFormat.of(schema=ollama_format(body.format)))
    generation = GenerationRequest(prompt, settings, stops, body.top, _constrained(reply_format))
    return await _respond(state, request, body, generation, chat=False)


def _constrained(reply_format: ReplyFormat) -> ReplyFormat | None:
    return reply_format if reply_format.grammar is not None or reply_format.prompted_tools \
        else None


def _messages(messages: list[OllamaMessage]) -> list[dict[str, Any]]:
    """Ollama messages with their images decoded (tool calls and results as they are, for
    tools.gemma_messages)."""
    out = []
    for i, message in enumerate(messages):
        if message.role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}]: role '{message.role}' is not supported "
                           "(system, user, assistant, tool)", param=f"messages[{i}]")
        content: str | list = message.content
        if message.images:
            content = [*({"type": "image", "attachment": _image(b64, i)}
                         for b64 in message.images), {"type": "text", "text": message.content}]
        turn = {"role": message.role, "content": content}
        if (message.model_extra or {}).get("tool_calls"):
            turn["tool_calls"] = message.model_extra["tool_calls"]
        out.append(turn)
    return out


def _image(data: str, i: int) -> Attachment:
    try:
        raw = base64.b64decode(data.split(",", 1)[-1] if data.startswith("data:") else data,
                               validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"messages[{i}]: an image is not valid base64 ({e})",
                       param=f"messages[{i}].images") from e
    return Attachment.load(raw)


async def _respond(state: ServerState, request: Request, body: OllamaRequest,
                   generation: GenerationRequest, chat: bool):
    job = Job(generation, request.app.state.loop)
    state.submit(job)
    started = time.perf_counter()
    if not body.stream:
        text, tokens, done = await until_done(request, job, job.result())
        request.state.tokens = (done.prompt_tokens, done.completion_tokens)
        return _final(state, _content(text, chat, done), done.finish_reason, done, started,
                      _logprobs(state, tokens, generation.logprobs))
    first = await first_event(request, job)

    async def lines() -> AsyncIterator[str]:
        try:
            event = first
            while True:
                if isinstance(event, Failed):
                    yield json.dumps(event.error.ollama()) + "\n"
                    return
                if isinstance(event, Done):
                    request.state.tokens = (event.prompt_tokens, event.completion_tokens)
                    if event.tool_calls:  # as Ollama streams them: whole, before the end
                        yield json.dumps({"model": state.name, "created_at": _iso(time.time()),
                                          **_content("", chat, event), "done": False}) + "\n"
                    yield json.dumps(_final(state, _content("", chat), event.finish_reason,
                                            event, started)) + "\n"
                    return
                part = {"model": state.name, "created_at": _iso(time.time()),
                        **_content(event.text, chat), "done": False}
                if generation.logprobs is not None:
                    part["logprobs"] = _logprobs(state, event.tokens, generation.logprobs)
                yield json.dumps(part) + "\n"
                event = await job.events().__anext__()
        finally:
            job.cancel()  # a client that went away stops the generation (no-op when done)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _content(text: str, chat: bool, done: Done | None = None) -> dict:
    if not chat:
        return {"response": text}
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if done is not None and done.tool_calls:
        message["tool_calls"] = [call.ollama() for call in done.tool_calls]
    return {"message": message}


def _final(state: ServerState, content: dict, reason: str, done: Done | None,
           started: float | None = None, logprobs: list | None = None) -> dict:
    final = {"model": state.name, "created_at": _iso(time.time()), **content, "done": True,
             "done_reason": "stop" if reason in ("cancelled", "tool_calls") else reason}
    if done is not None:
        final.update(
            total_duration=int((time.perf_counter() - started) * 1e9), load_duration=0,
            prompt_eval_count=done.prompt_tokens,
            prompt_eval_duration=int(done.prompt_seconds * 1e9),
            eval_count=done.completion_tokens, eval_duration=int(done.decode_seconds * 1e9))
    if logprobs is not None:
        final["logprobs"] = logprobs
    return final


def _logprobs(state: ServerState, tokens: list[TokenInfo], top: int | None) -> list | None:
    if top is None:
        return None
    decode = state.model.tokenizer.decode
    return [{"token": t.text, "logprob": t.logprob,
             "top_logprobs": [{"token": decode([i]), "logprob": lp}
                              for i, lp in t.top_logprobs[:top]]} for t in tokens]


def _details(state: ServerState) -> dict:
    q = state.model.quantization
    params = state.parameters
    return {"parent_model": "", "format": "mlx", "family": "gemma3", "families": ["gemma3"],
            "parameter_size": f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M",
            "quantization_level": f"{q['bits']}-bit g{q['group_size']}" if q else "none"}


def _entry(state: ServerState, name: str) -> dict:
    return {"name": name, "model": name, "modified_at": _iso(state.created),
            "size": state.size_bytes,
            "digest": "", "details": _details(state)}


def _capabilities(state: ServerState) -> list[str]:
    caps = ["completion"]
    if state.model.has_chat_template:
        caps.append("tools")
    if state.model.config.has_vision:
        caps.append("vision")
    return caps


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")
