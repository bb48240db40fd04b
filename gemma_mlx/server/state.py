"""What every route needs: the server's settings, the models it serves, and the worker.

It holds no MLX state: a loaded model is only read for its names, config and tokenizer; the
worker owns everything that runs on the device (loading included).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from .errors import APIError
from .jobs import Claim, Job
from .metrics import Metrics
from .registry import FOREVER, ModelRegistry, Servable, ServedModel
from .remote_images import ImageFetcher
from .worker import Worker

DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's five minutes


@dataclass
class ServerOptions:
    """`serve`'s settings (the CLI's flags)."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    cors: list[str] = field(default_factory=list)
    max_queue: int = 16
    allow_private_urls: bool = False
    max_context: int | None = None
    kv_bits: int | None = None
    pan_and_scan: bool = False
    num_draft_tokens: int = 3
    max_batch: int | None = None  # streams decoded together (None: sized to the memory)
    dense_batch: bool = False  # batches step over dense copies of the weights (more memory)
    cache_sessions: int = 4  # KV caches kept between requests (the prefix cache) ...
    cache_bytes: int = 8 << 30  # ... and their memory, at most (per model)
    max_body_bytes: int = 100 << 20  # a few large base64 images
    image_timeout_s: float = 20.0
    verbose: bool = False
    keep_alive: float = DEFAULT_KEEP_ALIVE_S  # seconds an idle model stays (FOREVER: always)
    max_loaded: int = 3  # models loaded at once
    max_memory: int | None = None  # bytes of weights loaded at once (None: 3/4 of the memory)
    allow_pull: bool = False  # requests may download models (and /api/pull, /api/delete work)


class ServerState:
    def __init__(self, options: ServerOptions, worker: Worker, metrics: Metrics,
                 registry: ModelRegistry):
        self.options = options
        self.worker = worker
        self.metrics = metrics
        self.registry = registry
        self.created = int(time.time())
        self.fetcher = ImageFetcher(options.allow_private_urls, options.image_timeout_s)

    @property
    def catalog(self):
        return self.registry.catalog

    @asynccontextmanager
    async def claim(self, name: str | None, keep_alive: float | None = None
                    ) -> AsyncIterator[Claim]:
        """The model a request names, loaded and held for it (see jobs.Claim)."""
        served = await self.registry.claim(name)
        claim = Claim(served, lambda: self.registry.release(served, keep_alive))
        try:
            yield claim
        finally:
            if not claim.handed_over:
                claim.release()

    def submit(self, job: Job) -> None:
        self.worker.submit(job)
        job.claim.handed_over = True

    def check_model(self, name: str | None) -> Servable:
        return self.catalog.find(name)

    def expires_at(self, served: ServedModel) -> float:
        """When an idle model goes (for /api/ps): FOREVER if it never does, and a model in
        use stays at least its keep-alive from now."""
        if served.pinned:
            return FOREVER
        if served.claims:
            return time.time() + self.options.keep_alive
        return served.expires_at


def served_model(model, entry: Servable, options: ServerOptions, draft_model=None,
                 pinned: bool = False) -> ServedModel:
    """A loaded model as the routes see it. Only shapes are read: nothing runs on the device."""
    from gemma_mlx.chat import context_limit
    from gemma_mlx.loading import parameter_bytes

    model.name = entry.name
    return ServedModel(entry, model, context_limit(model, options.max_context),
                       parameter_count(model), parameter_bytes(model.net), draft_model, pinned)


def load_served(entry: Servable, options: ServerOptions) -> ServedModel:
    """On the worker: load a catalogued model from its folder (never downloading)."""
    from gemma_mlx.loading import load

    if not entry.path.is_dir():
        raise APIError(404, f"{entry.name} is no longer on this machine ({entry.path}): "
                       f"`gemma-mlx pull {entry.name}` again", param="model",
                       code="model_not_found")
    return served_model(load(str(entry.path)), entry, options)


def parameter_count(model) -> int:
    """Weights by their full shapes, read once at start (only shapes: nothing runs on the
    device). A quantized layer holds scales.size * group_size weights."""
    from mlx.utils import tree_flatten

    total = 0
    for _, module in tree_flatten(model.net.leaf_modules(), is_leaf=lambda m: hasattr(m, "state")):
        own = dict(tree_flatten(module.parameters()))
        if "scales" in own and hasattr(module, "group_size"):
            total += own["scales"].size * module.group_size
            own = {k: v for k, v in own.items() if k not in ("weight", "scales", "biases")}
        total += sum(v.size for v in own.values())
    return total
