"""An OpenAI- and Ollama-compatible HTTP server: one loaded model, or the models on this machine
loaded on demand.

    import gemma_mlx
    from gemma_mlx.server import serve
    serve(gemma_mlx.load("4b"), port=8080)          # blocks; Ctrl-C stops it cleanly
    serve(port=8080, keep_alive=600)                 # every model `gemma-mlx list` shows

    app = gemma_mlx.server.create_app(model)          # an ASGI app to mount or test

Layout: app.py (the ASGI app and its guards), openai_api.py and ollama_api.py (the two
dialects), render.py (requests into prompts), jobs.py (a request as the worker runs it),
worker.py (the one thread that owns MLX), registry.py (which models, loaded when, for how
long), pool.py (the prefix cache), remote_images.py (image URLs, fetched safely), metrics.py,
state.py (options and what the routes share).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import uvicorn

from .app import create_app
from .state import ServerOptions

__all__ = ["ServerOptions", "create_app", "serve"]

log = logging.getLogger("gemma_mlx.server")


def serve(model=None, host: str = "127.0.0.1", port: int = 8080, draft_model=None,
          models: list[tuple[str, Path]] | None = None, group=None, **options: Any) -> None:
    """Serve `model` (kept loaded), else the `models` given as (name, folder), else every model
    `gemma-mlx list` shows (those two loaded on demand), until Ctrl-C (or SIGTERM): in-flight
    generations are cancelled, waiting requests refused with 503, and the worker ends before
    the process does. `group`: rank 0's distributed group, whose other ranks follow
    (`lockstep.follow`)."""
    settings = ServerOptions(host=host, port=port, **options)
    _log_to_stderr()
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("warning: listening on %s without --api-key: anyone who can reach this "
                    "address can use the model", host)
    app = create_app(model, settings, draft_model, models, group)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    server = _Server(config, app)
    server.run()


class _Server(uvicorn.Server):
    """uvicorn's server, which on its exit signal first stops the generations, so that open
    streams end at once instead of holding the shutdown until they finish."""

    def __init__(self, config: uvicorn.Config, app: Any):
        super().__init__(config)
        self.gemma = app.state.gemma

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.gemma.worker.close(timeout=0)
        super().handle_exit(sig, frame)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            where = f"http://{self.config.host}:{self.config.port}"
            fixed = self.gemma.catalog.fixed
            what = ", ".join(e.name for e in fixed) if fixed is not None else (
                "the models `gemma-mlx list` shows, loaded on demand")
            print(f"gemma-mlx serving {what} on {where} (OpenAI: {where}/v1, "
                  f"Ollama: {where}); Ctrl-C stops", file=sys.stderr, flush=True)


def _log_to_stderr() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
