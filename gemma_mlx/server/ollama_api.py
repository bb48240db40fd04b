"""The Ollama dialect: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version.

Answers stream as NDJSON by default, as Ollama's do; the last object has `done: true`, the
counts and the durations in nanoseconds. Images come as base64 strings. `options` cover
temperature, top_p, top_k, min_p, num_predict, seed, stop, repeat_penalty and num_ctx (which
may only lower the server's window); the other options are refused by name.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from tqdm.auto import tqdm

from gemma_mlx import __version__
from gemma_mlx.config import ModelConfig
from gemma_mlx.constrain import ReplyFormat, ollama_format
from gemma_mlx.images import Attachment
from gemma_mlx.loading import folder_has_chat_template, read_config
from gemma_mlx.models import format_size
from gemma_mlx.tools import gemma_messages

from .errors import APIError, unsupported
from .jobs import Claim, Done, Failed, GenerationRequest, Job, TokenInfo
from .registry import Servable, ServedModel, iso_time, parse_keep_alive
from .render import chat_prompt, completion_prompt, raw_text, sampling
from .responses import first_event, until_done
from .state import ServerState

router = APIRouter()
log = logging.getLogger("gemma_mlx.server")

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
    keep_alive: float | str | None = None  # how long the model stays loaded after this
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

    @property
    def keep(self) -> float | None:
        """keep_alive in seconds (None: the server's --keep-alive)."""
        return parse_keep_alive(self.keep_alive)

    def settings(self, served: ServedModel, prompt) -> tuple[Any, list[str]]:
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
        return sampling(served, prompt, predict or None, **given), [stop] if isinstance(
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


class PullRequest(ModelRequest):
    stream: bool = True
    insecure: bool | None = None  # names a registry's TLS: nothing to do here


def state_of(request: Request) -> ServerState:
    return request.app.state.gemma


@router.get("/api/version")
async def version() -> dict:
    return {"version": __version__}


@router.get("/api/tags")
async def tags(request: Request) -> dict:
    state = state_of(request)
    entries = await run_in_threadpool(state.catalog.entries)
    return {"models": [_entry(entry, state.registry.loaded_entry(entry)) for entry in entries]}


@router.get("/api/ps")
async def ps(request: Request) -> dict:
    state = state_of(request)
    models = []
    for served in state.registry.loaded():
        entry = _entry(served.entry, served)
        entry.update(expires_at=iso_time(state.expires_at(served)), size=served.size_bytes,
                     size_vram=served.size_bytes, context_length=served.context_limit)
        models.append(entry)
    return {"models": models}


@router.post("/api/show")
async def show(body: ModelRequest, request: Request) -> dict:
    state = state_of(request)
    entry = await run_in_threadpool(state.check_model, body.model or body.name)
    served = state.registry.loaded_entry(entry)
    facts = await run_in_threadpool(_Facts.of, entry, served, state.options.max_context)
    text = facts.config.text
    return {
        "modelfile": f"FROM {entry.name}\n", "parameters": "", "template": "{{ .Prompt }}",
        "license": "Gemma Terms of Use", "details": _details(entry, served),
        "model_info": {"general.architecture": "gemma3",
                       "gemma3.context_length": facts.context_length,
                       "gemma3.embedding_length": text.hidden_size,
                       "gemma3.block_count": text.num_hidden_layers,
                       "gemma3.attention.head_count": text.num_attention_heads,
                       "gemma3.attention.head_count_kv": text.num_key_value_heads,
                       "gemma3.attention.sliding_window": text.sliding_window},
        "capabilities": facts.capabilities,
        "modified_at": _iso(entry.modified),
    }


@router.post("/api/chat")
async def chat(body: ChatRequest, request: Request):
    state = state_of(request)
    request.state.body = body.model_dump(exclude_none=True)
    body.refuse_unsupported()
    keep = body.keep
    reply_format = await run_in_threadpool(
        lambda: ReplyFormat.of(body.tools, schema=ollama_format(body.format)))
    if not body.messages:  # Ollama's way to load (or, with keep_alive 0, unload) a model
        return await _load_or_unload(state, body.model, keep,
                                     {"message": {"role": "assistant", "content": ""}})
    async with state.claim(body.model, keep) as claim:
        messages = await run_in_threadpool(_messages, body.messages)
        messages = gemma_messages(messages, reply_format.prompted_tools, reply_format.choice)
        prompt = await run_in_threadpool(chat_prompt, claim.served, messages,
                                         state.options.pan_and_scan)
        settings, stops = body.settings(claim.served, prompt)
        generation = GenerationRequest(prompt, settings, stops, body.top,
                                       _constrained(reply_format), remember="turn")
        return await _respond(state, claim, request, body, generation, chat=True)


@router.post("/api/generate")
async def generate(body: GenerateRequest, request: Request):
    state = state_of(request)
    request.state.body = body.model_dump(exclude_none=True)
    body.refuse_unsupported("suffix", "template", "context")
    keep = body.keep
    reply_format = await run_in_threadpool(
        lambda: ReplyFormat.of(schema=ollama_format(body.format)))
    if not body.prompt and not body.images:  # Ollama's way to load or unload a model
        return await _load_or_unload(state, body.model, keep, {"response": ""})
    async with state.claim(body.model, keep) as claim:
        served = claim.served
        remember = {}
        if body.raw or not served.has_chat_template:
            if body.images:
                raise APIError(400, "images need the chat template: leave out raw", param="raw")
            prompt = await run_in_threadpool(completion_prompt, served, body.prompt,
                                             body.system)
            remember = {"remember": "completion",
                        "raw_prompt": raw_text(body.prompt, body.system)}
        else:
            turns = [{"role": "system", "content": body.system}] if body.system else []
            user = OllamaMessage(role="user", content=body.prompt, images=body.images)
            turns += await run_in_threadpool(_messages, [user])
            prompt = await run_in_threadpool(chat_prompt, served, turns,
                                             state.options.pan_and_scan)
        settings, stops = body.settings(served, prompt)
        generation = GenerationRequest(prompt, settings, stops, body.top,
                                       _constrained(reply_format), **remember)
        return await _respond(state, claim, request, body, generation, chat=False)


async def _load_or_unload(state: ServerState, name: str, keep: float | None,
                          content: dict) -> dict:
    """A request without a prompt loads its model (keep_alive 0: unloads it)."""
    if keep == 0:
        entry = await run_in_threadpool(state.check_model, name)
        state.registry.expire(entry)
        return {"model": entry.name, "created_at": _iso(time.time()), **content, "done": True,
                "done_reason": "unload"}
    async with state.claim(name, keep) as claim:
        return _final(claim.served, content, "load", None)


@router.post("/api/pull")
async def pull(body: PullRequest, request: Request):
    """Download a model (--allow-pull only): Ollama's progress objects, then success."""
    state = state_of(request)
    name = _allowed(state, body.model or body.name, "pull")
    if not body.stream:
        await state.registry.pull(name)
        return {"status": "success"}
    progress = PullProgress(request.app.state.loop)
    task = asyncio.ensure_future(state.registry.pull(name, progress.bar))

    async def lines() -> AsyncIterator[str]:
        yield json.dumps({"status": f"pulling {name}"}) + "\n"
        async for update in progress.updates(task):
            yield json.dumps(update) + "\n"
        try:
            await task
        except APIError as e:
            yield json.dumps(e.ollama()) + "\n"
            return
        yield json.dumps({"status": "success"}) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.delete("/api/delete")
async def delete(body: ModelRequest, request: Request) -> Response:
    """Delete a model from this machine (--allow-pull only)."""
    state = state_of(request)
    name = _allowed(state, body.model or body.name, "delete")
    freed = await state.registry.delete(name)
    log.info("deleted %s (%s freed)", name, format_size(freed))
    return Response(status_code=200)


def _allowed(state: ServerState, name: str | None, what: str) -> str:
    if not state.options.allow_pull:
        raise APIError(403, f"this server does not {what} models: start it with --allow-pull, "
                       f"or run `gemma-mlx {'pull' if what == 'pull' else 'rm'}` on its machine",
                       code="forbidden")
    if not name:
        raise APIError(400, "name the model", param="model")
    return name


class PullProgress:
    """A tqdm class for huggingface_hub's download bars whose updates reach an async stream
    as Ollama's {"status", "digest", "total", "completed"} objects."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[dict] = asyncio.Queue()
        progress = self

        class Bar(tqdm):
            def __init__(self, *args: Any, **kwargs: Any):
                kwargs["disable"] = False
                kwargs["file"] = io.StringIO()
                super().__init__(*args, **kwargs)

            def update(self, n: float | None = 1) -> bool | None:
                shown = super().update(n)
                progress.post({"status": f"downloading {self.desc or ''}".strip(),
                               "digest": self.desc or "", "total": int(self.total or 0),
                               "completed": int(self.n)})
                return shown

        self.bar = Bar

    def post(self, update: dict) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, update)

    async def updates(self, task: asyncio.Future) -> AsyncIterator[dict]:
        while not (task.done() and self.queue.empty()):
            try:
                yield await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                continue


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


async def _respond(state: ServerState, claim: Claim, request: Request, body: OllamaRequest,
                   generation: GenerationRequest, chat: bool):
    served = claim.served
    job = Job(generation, request.app.state.loop, claim)
    state.submit(job)
    started = time.perf_counter()
    if not body.stream:
        text, tokens, done = await until_done(request, job, job.result())
        request.state.tokens = (done.prompt_tokens, done.completion_tokens)
        return _final(served, _content(text, chat, done), done.finish_reason, done, started,
                      _logprobs(served, tokens, generation.logprobs))
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
                        yield json.dumps({"model": served.name, "created_at": _iso(time.time()),
                                          **_content("", chat, event), "done": False}) + "\n"
                    yield json.dumps(_final(served, _content("", chat), event.finish_reason,
                                            event, started)) + "\n"
                    return
                part = {"model": served.name, "created_at": _iso(time.time()),
                        **_content(event.text, chat), "done": False}
                if generation.logprobs is not None:
                    part["logprobs"] = _logprobs(served, event.tokens, generation.logprobs)
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


def _final(served: ServedModel, content: dict, reason: str, done: Done | None,
           started: float | None = None, logprobs: list | None = None) -> dict:
    final = {"model": served.name, "created_at": _iso(time.time()), **content, "done": True,
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


def _logprobs(served: ServedModel, tokens: list[TokenInfo], top: int | None) -> list | None:
    if top is None:
        return None
    decode = served.model.tokenizer.decode
    return [{"token": t.text, "logprob": t.logprob,
             "top_logprobs": [{"token": decode([i]), "logprob": lp}
                              for i, lp in t.top_logprobs[:top]]} for t in tokens]


def _details(entry: Servable, served: ServedModel | None) -> dict:
    """Ollama's details; the parameter count is known once the model is loaded."""
    size = ""
    if served is not None:
        params = served.parameters
        size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
    quantization = entry.quantization
    if served is not None and not quantization:
        q = served.model.quantization
        quantization = f"{q['bits']}-bit g{q['group_size']}" if q else "none"
    return {"parent_model": "", "format": "mlx", "family": "gemma3", "families": ["gemma3"],
            "parameter_size": size, "quantization_level": quantization}


def _entry(entry: Servable, served: ServedModel | None) -> dict:
    return {"name": entry.name, "model": entry.name, "modified_at": _iso(entry.modified),
            "size": entry.size, "digest": "", "details": _details(entry, served)}


@dataclass
class _Facts:
    """What /api/show says of a model, loaded or read from its folder (no loading)."""

    config: ModelConfig
    context_length: int
    capabilities: list[str]

    @classmethod
    def of(cls, entry: Servable, served: ServedModel | None, max_context: int | None) -> _Facts:
        if served is not None:
            config, chat = served.model.config, served.has_chat_template
            context = served.context_limit
        else:
            config = ModelConfig.from_dict(read_config(entry.path))
            chat = folder_has_chat_template(entry.path)
            context = min(config.text.max_position_embeddings, max_context or math.inf)
        caps = ["completion"] + (["tools"] if chat else []) + (
            ["vision"] if config.has_vision else [])
        return cls(config, int(context), caps)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")
