"""Gemma 3 on MLX: `load` a model, `generate` or `stream` a reply.

    import gemma_mlx
    model = gemma_mlx.load("4b")
    print(gemma_mlx.generate(model, "Why is the sky blue?", max_tokens=200))
    chat = gemma_mlx.Chat(model, system="Be brief.")
    print(chat.send("What is in this picture?", images=["photo.jpg"]))
    draft = gemma_mlx.load_draft("270m", model)  # speculative decoding: same replies, faster
    print(gemma_mlx.generate(model, "Tell me a story.", draft_model=draft))
    chat.send("Weather in Oslo?", tools=[get_weather])  # calls your function, answers with it
    print(gemma_mlx.generate(model, "A person:", json_schema={"type": "object"}))
    gemma_mlx.serve(model, port=8080)  # OpenAI's and Ollama's APIs over HTTP, until Ctrl-C
    for m in gemma_mlx.installed_models():  # what `gemma-mlx list` shows (gemma_mlx.models)
        print(m.name, m.size, m.last_used)
    model = gemma_mlx.load("27b", distributed="tensor")  # on every rank under mlx.launch

The names below are imported on first use, so `python -m gemma_mlx` starts (and can be
interrupted, or print its help) before MLX is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    BadCheckpoint,
    BadImage,
    BadRequest,
    BadSplit,
    ContextOverflow,
    GemmaError,
    ModelNotFound,
    RankUnavailable,
    ServerNotFound,
)

__version__ = "0.1.0"

_LAZY = {
    "Attachment": "chat", "Chat": "chat", "Message": "chat", "generate": "chat",
    "stream": "chat", "Chunk": "engine", "SamplingSettings": "engine", "Stats": "engine",
    "Model": "loading", "load": "loading", "load_draft": "speculative", "Session": "session",
    "serve": "server", "batch_generate": "batch", "Tool": "tools", "ToolCall": "tools",
    "InstalledModel": "models", "installed_models": "models",
}

__all__ = [
    "Attachment", "BadCheckpoint", "BadImage", "BadRequest", "BadSplit", "Chat", "Chunk",
    "ContextOverflow", "GemmaError", "InstalledModel", "Message", "Model", "ModelNotFound",
    "RankUnavailable", "SamplingSettings", "ServerNotFound", "Session", "Stats", "Tool",
    "ToolCall", "__version__", "batch_generate", "generate", "installed_models", "load",
    "load_draft", "serve", "stream",
]

if TYPE_CHECKING:
    from .batch import batch_generate
    from .chat import Attachment, Chat, Message, generate, stream
    from .engine import Chunk, SamplingSettings, Stats
    from .loading import Model, load
    from .models import InstalledModel, installed_models
    from .server import serve
    from .session import Session
    from .speculative import load_draft
    from .tools import Tool, ToolCall


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'gemma_mlx' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
