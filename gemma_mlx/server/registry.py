"""Which models a server may serve, which it holds loaded, and when each one goes.

Three ways to start a server, three catalogues of what requests may name:
- `serve --model X`: that one model, loaded at start and kept (pinned);
- `serve --model X --model Y ...`: those models, found (or downloaded) at start, loaded on
  their first request;
- `serve` alone: every model `gemma-mlx list` shows, loaded on their first request.

A loaded model stays for its keep-alive (`--keep-alive`, or Ollama's `keep_alive` on the last
request: 0 unloads it as soon as it is idle, a negative one keeps it) and goes earlier when
another one needs its place (`--max-loaded`, `--max-memory`): the least recently used idle
one first. A model that requests are using (`claims`) is never unloaded. Requests never make
the server download or load anything outside its catalogue, unless it runs with
`--allow-pull`; even then, a request names models, never paths.

Loading and unloading run on the worker thread (they are MLX work); this module decides what
to load and what to drop, and the routes await it.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma_mlx import models as installed
from gemma_mlx.errors import BadRequest, GemmaError
from gemma_mlx.hub import ALIASES, MODEL_NAMES, PYPI_270M, _looks_like_repo_id

from .errors import APIError, from_library
from .replies import ReplyMemory

FOREVER = math.inf
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: float | int | str | None, what: str = "keep_alive") -> float | None:
    """Seconds from Ollama's keep_alive: a number of seconds or a Go duration ("5m", "1h30m",
    "300ms"); negative means forever (FOREVER); None stays None (the server's default)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise BadRequest(f"{what} '{value}' is not a duration: give seconds or a "
                                 "duration such as 30s, 5m or 1h (negative: keep loaded)") from None
            seconds = sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    return FOREVER if seconds < 0 else seconds


def served_names(name: str, path: Path, aliases: tuple[str, ...] = ()) -> list[str]:
    """The names a client may use for a model: as it was given or listed, its other names in
    `gemma-mlx list`, its alias and repo id, and the Ollama-style `gemma3:<alias>`."""
    names = [name, *aliases]
    by_repo = {repo.lower(): alias for alias, repo in ALIASES.items()}
    for given in (name, *aliases):
        key = given.strip().lower()
        alias = key if key in ALIASES or key == PYPI_270M or key in MODEL_NAMES \
            else by_repo.get(key)
        if alias is not None:
            names += [alias, f"gemma3:{alias}"]
            if alias in ALIASES:
                names.append(ALIASES[alias])
    if "/" in name or Path(name).exists():
        names.append(Path(name).name)
    return list(dict.fromkeys(names))


@dataclass
class Servable:
    """A model requests may name (loaded or not): what /api/tags and /v1/models show."""

    name: str
    names: list[str]
    path: Path
    size: int  # bytes on disk
    quantization: str = ""
    modified: float = field(default_factory=time.time)


@dataclass(eq=False)
class ServedModel:
    """A loaded model and what the routes read about it (nothing here runs on the device)."""

    entry: Servable
    model: Any  # gemma_mlx.Model
    context_limit: int
    parameters: int
    size_bytes: int  # the weights in memory
    draft_model: Any = None
    pinned: bool = False  # loaded at start, never unloaded
    loaded_at: float = field(default_factory=time.time)
    claims: int = 0  # requests using it now
    expires_at: float = FOREVER  # when it goes, once idle
    last_used: float = field(default_factory=time.monotonic)
    replies: ReplyMemory = field(default_factory=ReplyMemory)  # its replies' ids by text

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def names(self) -> list[str]:
        return self.entry.names

    @property
    def has_chat_template(self) -> bool:
        return self.model.has_chat_template


class Catalog:
    """The models a server may serve: a fixed list, or whatever `gemma-mlx list` shows."""

    def __init__(self, fixed: list[Servable] | None = None, allow_pull: bool = False):
        self.fixed = fixed
        self.allow_pull = allow_pull

    def entries(self) -> list[Servable]:
        if self.fixed is not None:
            return list(self.fixed)
        return [_servable(m) for m in installed.installed_models()
                if m.complete and m.path is not None]

    def find(self, name: str | None) -> Servable:
        key = (name or "").strip().lower()
        for entry in self.entries():
            if key in (n.lower() for n in entry.names):
                return entry
        raise self.not_found(name)

    def pullable(self, name: str) -> bool:
        """A name a pull may fetch: an alias or a Hub repo id (never a path or a file)."""
        key = name.strip().lower()
        return self.allow_pull and self.fixed is None and (
            key in MODEL_NAMES or (_looks_like_repo_id(name) and not Path(name).exists()))

    def not_found(self, name: str | None) -> APIError:
        known = [e.name for e in self.entries()]
        if self.fixed is not None:
            hint = f"use one of {', '.join(n for e in self.fixed for n in e.names)}"
        elif self.allow_pull:
            hint = "pull it first (/api/pull), or name one of: " + (", ".join(known) or "none")
        else:
            hint = ("`gemma-mlx pull` it on the server's machine (this server does not "
                    "download: --allow-pull lets it), or use one of: " + (", ".join(known)
                                                                           or "none"))
        return APIError(404, f"the model '{name}' is not served here: {hint}", param="model",
                        code="model_not_found")


def _servable(model: installed.InstalledModel) -> Servable:
    return Servable(model.name, served_names(model.name, model.path, model.aliases), model.path,
                    model.size, model.quantization, model.modified.timestamp())


def fixed_entry(name: str, path: Path) -> Servable:
    """A model given to `serve` by name or path (found at start)."""
    listed = installed.model_at(path)
    size = listed.size if listed is not None else sum(
        f.stat().st_size for f in Path(path).glob("*.safetensors"))
    quantization = listed.quantization if listed is not None else ""
    aliases = listed.names if listed is not None else ()
    return Servable(name, served_names(name, path, tuple(a for a in aliases if a != name)),
                    Path(path), size, quantization)


class ModelRegistry:
    """Loaded models by folder, their claims and their time to go.

    `claim` (on the event loop) hands a request its loaded model, loading it through the
    worker when needed; `release` (from the worker, when the request ends) starts its
    keep-alive. `make_room`, `expired` and `unloaded` are the worker's side."""

    def __init__(self, catalog: Catalog, run_on_worker: Callable, keep_alive: float,
                 max_loaded: int, max_memory: int):
        self.catalog = catalog
        self.run_on_worker = run_on_worker  # (fn) -> awaitable result of fn() on the worker
        self.keep_alive = keep_alive
        self.max_loaded = max(1, max_loaded)
        self.max_memory = max_memory
        self.loader: Callable[[Servable], ServedModel] | None = None  # set by the app
        self.unloader: Callable[[ServedModel], None] | None = None
        self._loaded: dict[Path, ServedModel] = {}
        self._loading: dict[Path, asyncio.Future] = {}
        self._lock = threading.Lock()

    # ---- what the routes see ------------------------------------------------------------------

    def loaded(self) -> list[ServedModel]:
        with self._lock:
            return list(self._loaded.values())

    def loaded_entry(self, entry: Servable) -> ServedModel | None:
        with self._lock:
            return self._loaded.get(entry.path)

    def add(self, served: ServedModel) -> None:
        with self._lock:
            self._loaded[served.entry.path] = served

    async def claim(self, name: str | None) -> ServedModel:
        """The loaded model `name` names, claimed for one request (loaded first if need be;
        with --allow-pull, pulled first if it is not on this machine)."""
        from starlette.concurrency import run_in_threadpool

        key = (name or "").strip().lower()
        with self._lock:  # the common case, without listing the disk
            for served in self._loaded.values():
                if key in (n.lower() for n in served.names):
                    served.claims += 1
                    served.last_used = time.monotonic()
                    return served
        try:
            entry = await run_in_threadpool(self.catalog.find, name)
        except APIError:
            if name is None or not self.catalog.pullable(name):
                raise
            await self.pull(name)
            entry = await run_in_threadpool(self.catalog.find, name)
        while True:
            with self._lock:
                served = self._loaded.get(entry.path)
                if served is not None:
                    served.claims += 1
                    served.last_used = time.monotonic()
                    return served
                loading = self._loading.get(entry.path)
                if loading is None:
                    loading = asyncio.ensure_future(self.run_on_worker(
                        lambda: self._load(entry)))
                    self._loading[entry.path] = loading
            try:
                await asyncio.shield(loading)
            finally:
                with self._lock:
                    if self._loading.get(entry.path) is loading and loading.done():
                        del self._loading[entry.path]

    def release(self, served: ServedModel, keep_alive: float | None = None) -> None:
        """A request is done with `served` (any thread): once idle, it stays for its
        keep-alive (the request's, else the server's)."""
        with self._lock:
            served.claims = max(0, served.claims - 1)
            served.last_used = time.monotonic()
            if served.claims == 0 and not served.pinned:
                keep = self.keep_alive if keep_alive is None else keep_alive
                served.expires_at = time.time() + keep

    # ---- the worker's side -----------------------------------------------------------------

    def _load(self, entry: Servable) -> ServedModel:
        """On the worker: make room (or wait for it: NotYet), then load."""
        with self._lock:
            if entry.path in self._loaded:
                return self._loaded[entry.path]
        self.make_room(entry)
        served = self.loader(entry)
        self.add(served)
        return served

    def make_room(self, entry: Servable) -> None:
        """Unload idle models, least recently used first, until `entry` fits in --max-loaded
        and --max-memory. NotYet when the models in the way are busy (the load waits for
        them); a 503 when it could never fit."""
        if entry.size > self.max_memory:
            raise APIError(503, f"{entry.name} needs {installed.format_size(entry.size)}, over "
                           f"the server's --max-memory ({installed.format_size(self.max_memory)})"
                           ": raise --max-memory", code="insufficient_memory")
        while True:
            with self._lock:
                loaded = list(self._loaded.values())
                used = sum(s.size_bytes for s in loaded)
                if len(loaded) < self.max_loaded and used + entry.size <= self.max_memory:
                    return
                idle = [s for s in loaded if s.claims == 0 and not s.pinned]
                if not idle:
                    raise NotYet()
                victim = min(idle, key=lambda s: s.last_used)
                del self._loaded[victim.entry.path]
            self.unloader(victim)

    def expired(self, now: float | None = None) -> list[ServedModel]:
        """Idle models past their keep-alive, taken out of the loaded set (the worker unloads
        them)."""
        now = time.time() if now is None else now
        with self._lock:
            gone = [s for s in self._loaded.values()
                    if s.claims == 0 and not s.pinned and s.expires_at <= now]
            for served in gone:
                del self._loaded[served.entry.path]
        return gone

    def expire(self, entry: Servable) -> None:
        """Ollama's unload (keep_alive 0, no prompt): an idle model goes at the worker's next
        look; one in use goes when its requests end. A model not loaded stays so."""
        with self._lock:
            served = self._loaded.get(entry.path)
            if served is not None and not served.pinned:
                served.expires_at = time.time()

    def take_out(self, served: ServedModel) -> bool:
        """Take an idle model out of the loaded set (to unload it now); False if in use."""
        with self._lock:
            if served.claims or served.pinned or self._loaded.get(served.entry.path) is not served:
                return False
            del self._loaded[served.entry.path]
            return True

    # ---- pull and delete (--allow-pull) ----------------------------------------------------

    async def pull(self, name: str, progress: Any = None) -> installed.InstalledModel:
        """Download (in a thread: no MLX) then import and check (on the worker)."""
        from starlette.concurrency import run_in_threadpool

        if not self.catalog.pullable(name):
            raise self.catalog.not_found(name) if not self.catalog.allow_pull else APIError(
                400, f"'{name}' cannot be pulled: name an alias ({', '.join(MODEL_NAMES)}) or "
                "a Hub repo id", param="model")
        try:
            await run_in_threadpool(installed.fetch, name, None, progress)
            return await self.run_on_worker(lambda: installed.finish_pull(name, None, progress))
        except GemmaError as e:
            raise from_library(e) from e

    async def delete(self, name: str | None) -> int:
        """Unload (if idle) and delete a model `gemma-mlx list` shows; the bytes freed."""
        entry = self.catalog.find(name)
        served = self.loaded_entry(entry)
        if served is not None:
            if not self.take_out(served):
                raise APIError(409, f"{entry.name} is answering requests: delete it when they "
                               "are done", code="model_in_use")
            await self.run_on_worker(lambda: self.unloader(served))
        model = installed.model_at(entry.path)
        if model is None:
            raise self.catalog.not_found(name)
        return installed.remove(model)


class NotYet(Exception):  # noqa: N818 - a signal to the worker, not an error
    """A load that must wait for models in use to become idle."""


def iso_time(seconds: float) -> str:
    from datetime import datetime, timezone

    if seconds == FOREVER:
        seconds = time.time() + 10 * 365 * 86400
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")
