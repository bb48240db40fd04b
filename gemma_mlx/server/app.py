"""The ASGI app: the two API dialects on one model, behind the server's safety rules.

Around the routes: an API key on everything but /health, bounded request bodies, CORS only
when asked, one log line per request, and every error in its dialect's shape with the right
status (400, never FastAPI's 422). The worker thread starts and stops with the app.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gemma_mlx import __version__
from gemma_mlx.errors import GemmaError

from . import ollama_api, openai_api
from .errors import APIError, from_library
from .metrics import Metrics
from .registry import Catalog, ModelRegistry, fixed_entry
from .state import ServerOptions, ServerState, load_served, served_model
from .worker import HostOptions, Worker

log = logging.getLogger("gemma_mlx.server")


def create_app(model=None, options: ServerOptions | None = None, draft_model=None,
               models: list[tuple[str, Path]] | None = None, group=None) -> FastAPI:
    """The server as an ASGI app, for `serve` and for mounting in another server. It serves
    `model` (loaded, kept loaded), else the `models` given as (name, folder), else every model
    `gemma-mlx list` shows; those two load on demand. The app owns a worker thread that runs
    the models from startup to shutdown (its lifespan). With a distributed `group` (rank 0 of
    a `load(..., distributed=...)` model), the other ranks follow each request (lockstep.py):
    one at a time."""
    options = options or ServerOptions()
    metrics = Metrics()
    if model is not None:
        catalog = Catalog([fixed_entry(model.name, model.path)])
    elif models:
        catalog = Catalog([fixed_entry(name, path) for name, path in models])
    else:
        catalog = Catalog(None, options.allow_pull)
    host_options = HostOptions(options.max_batch, options.dense_batch, options.cache_sessions,
                               options.cache_bytes, options.kv_bits, options.num_draft_tokens,
                               one_at_a_time=group is not None)
    registry = ModelRegistry(catalog, lambda fn: worker.call(fn), options.keep_alive,
                             options.max_loaded, options.max_memory or default_max_memory())
    worker = Worker(host_options, options.max_queue, metrics, registry.expired,
                    around=leading(group, model) if group is not None else nullcontext)
    registry.loader = lambda entry: load_served(entry, options)
    registry.unloader = worker.unload
    if model is not None:
        registry.add(served_model(model, catalog.fixed[0], options, draft_model, pinned=True))
    state = ServerState(options, worker, metrics, registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loop = asyncio.get_running_loop()
        worker.start()
        try:
            yield
        finally:
            worker.close()

    app = FastAPI(title="gemma-mlx", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.gemma = state
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    _add_basic_routes(app, state)
    _add_error_handlers(app)
    if options.cors:
        app.add_middleware(CORSMiddleware, allow_origins=options.cors, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(Guard, options=options, metrics=metrics)
    return app


def leading(group, model):
    """The worker thread's context on rank 0 of a distributed run: it leads, the others
    follow every generation of `model`."""
    from gemma_mlx.lockstep import leading as lead

    @contextmanager
    def context():
        with lead(group) as leader:
            leader.attach(model)
            yield

    return context


def default_max_memory() -> int:
    """Three quarters of the device's memory: the weights of the models loaded at once stay
    under it."""
    from gemma_mlx.batch import device_memory

    return device_memory() * 3 // 4


def _add_basic_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> dict:
        if not state.worker.alive:
            raise APIError(503, "the model worker is not running", code="unavailable")
        return {"status": "ok", "models": [s.name for s in state.registry.loaded()],
                "queue": state.worker.waiting}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def root() -> PlainTextResponse:
        return PlainTextResponse("gemma-mlx is running")  # what Ollama answers, in spirit


def _ollama(path: str) -> bool:
    return path.startswith("/api/")


def error_response(path: str, error: APIError) -> JSONResponse:
    body = error.ollama() if _ollama(path) else error.openai()
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(request.url.path, error)

    @app.exception_handler(GemmaError)
    async def library_error(request: Request, error: GemmaError) -> JSONResponse:
        return error_response(request.url.path, from_library(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, where = "the request body is not valid JSON", None
        return error_response(request.url.path, APIError(
            400, f"{where + ': ' if where else ''}{message}", param=where or None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(
            error.status_code, str(error.detail))
        return error_response(request.url.path, APIError(error.status_code, message))

    @app.exception_handler(Exception)
    async def crash(request: Request, error: Exception) -> JSONResponse:
        log.exception("request failed")
        return error_response(request.url.path, APIError(
            500, f"internal error: {type(error).__name__}: {error}"))


class Guard:
    """Pure ASGI middleware (so streams pass through untouched): the API key, the body bound,
    the request log line and the per-route counts."""

    def __init__(self, app: ASGIApp, options: ServerOptions, metrics: Metrics):
        self.app = app
        self.options = options
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope = _json_body(scope)
        path, method = scope["path"], scope["method"]
        started = time.perf_counter()
        status = {"code": 500}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await error_response(path, refusal)(scope, receive, sending)
        else:
            await self._guarded(scope, receive, sending)
        self._log(scope, method, path, status["code"], time.perf_counter() - started)

    def _refusal(self, scope: Scope) -> APIError | None:
        headers = dict(scope["headers"])
        key = self.options.api_key
        if key and scope["path"] != "/health" and scope["method"] != "OPTIONS":
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return APIError(401, "missing or wrong API key: send the header "
                                "'Authorization: Bearer <key>'", code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.options.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is over {self.options.max_body_bytes >> 20} MB:"
                        " send smaller images or fewer of them", code="request_too_large")

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A body without Content-Length is counted as it arrives: past the bound the app is
        told the client left, and whatever it answers is replaced by the 413."""
        seen, over = 0, False

        async def receiving() -> Message:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.options.max_body_bytes:
                over = True
                return {"type": "http.disconnect"}
            return message

        async def sending(message: Message) -> None:
            if not over:
                await send(message)
            elif message["type"] == "http.response.start":
                await error_response(scope["path"], self._too_large())(scope, receive, send)

        await self.app(scope, receiving, sending)

    def _log(self, scope: Scope, method: str, path: str, code: int, seconds: float) -> None:
        route = path if path in KNOWN_PATHS else "other"
        self.metrics.requests.labels(route, str(code)).inc()
        state: dict[str, Any] = scope.get("state", {})
        tokens = state.get("tokens")
        counts = f" {tokens[0]}+{tokens[1]} tokens" if tokens else ""
        log.info("%s %s %d%s %.2f s", method, path, code, counts, seconds)
        if self.options.verbose and "body" in state:
            log.info("  body: %s", json.dumps(state["body"])[:2000])


def _json_body(scope: Scope) -> Scope:
    """Every body this server takes is JSON, whatever its Content-Type says: `curl -d`, as in
    Ollama's own examples, sends JSON as a form."""
    if scope["method"] not in ("POST", "PUT", "DELETE"):
        return scope
    given = dict(scope["headers"]).get(b"content-type", b"")
    if b"json" in given:
        return scope
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


KNOWN_PATHS = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/api/chat",
               "/api/generate", "/api/tags", "/api/show", "/api/ps", "/api/version",
               "/api/pull", "/api/delete", "/health", "/metrics", "/"}
