"""What every route needs to know about the served model and the server's settings.

It holds no MLX state: the model object is only read for its names, config and tokenizer; the
worker owns everything that runs on the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from gemma_mlx.hub import ALIASES, PYPI_270M

from .errors import APIError
from .jobs import Job
from .metrics import Metrics
from .remote_images import ImageFetcher
from .worker import Worker


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
    cache_bytes: int = 8 << 30  # ... and their memory, at most
    max_body_bytes: int = 100 << 20  # a few large base64 images
    image_timeout_s: float = 20.0
    verbose: bool = False


def served_names(name: str, path: Path) -> list[str]:
    """The names a client may use for the model: as it was loaded, its alias and repo id, and
    the Ollama-style `gemma3:<size>`."""
    key = name.strip().lower()
    names = [name]
    by_repo = {repo.lower(): alias for alias, repo in ALIASES.items()}
    alias = key if key in ALIASES or key == PYPI_270M else by_repo.get(key)
    if alias is not None:
        names += [alias, f"gemma3:{alias}"]
        if alias in ALIASES:
            names.append(ALIASES[alias])
    elif "/" in name or Path(name).exists():
        names.append(Path(name).name)
    return list(dict.fromkeys(names))


class ServerState:
    def __init__(self, model, options: ServerOptions, worker: Worker, metrics: Metrics,
                 draft_model=None):
        self.model = model
        self.draft_model = draft_model
        self.options = options
        self.worker = worker
        self.metrics = metrics
        self.names = served_names(model.name, model.path)
        self.created = int(time.time())
        self.fetcher = ImageFetcher(options.allow_private_urls, options.image_timeout_s)
        self.parameters = parameter_count(model)
        self.size_bytes = sum(f.stat().st_size for f in model.path.glob("*.safetensors"))

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def context_limit(self) -> int:
        return self.worker.context_limit

    def check_model(self, name: str | None) -> None:
        if name not in self.names:
            raise APIError(404, f"the model '{name}' is not served here: use one of "
                           f"{', '.join(self.names)}", param="model", code="model_not_found")

    def submit(self, job: Job) -> None:
        self.worker.submit(job)


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
