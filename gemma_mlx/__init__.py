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
"""

from .chat import Attachment, Chat, Message, generate, stream
from .engine import Chunk, SamplingSettings, Stats
from .errors import BadCheckpoint, BadImage, BadRequest, ContextOverflow, GemmaError, ModelNotFound
from .loading import Model, load
from .speculative import load_draft
from .tools import Tool, ToolCall

__version__ = "0.1.0"

__all__ = [
    "Attachment", "BadCheckpoint", "BadImage", "BadRequest", "Chat", "Chunk", "ContextOverflow",
    "GemmaError", "Message", "Model",
    "ModelNotFound", "SamplingSettings", "Stats", "Tool", "ToolCall", "__version__", "generate",
    "load", "load_draft", "stream",
]
