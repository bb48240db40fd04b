"""The terminal chat app (Textual) over gemma_mlx's public API: `python -m gemma_mlx chat`."""

from .app import ChatApp, run

__all__ = ["ChatApp", "run"]
