"""The whole Gemma 3 model: the text decoder, and (on 4B+) the SigLIP tower and projector.

Parameter names follow the mlx-vlm / transformers multimodal layout
(`language_model.model.*`, `vision_tower.*`, `multi_modal_projector.*`); text-only checkpoints
are mapped onto it by the loader.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig, TextConfig
from .text import TextDecoder


class LanguageModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = TextDecoder(cfg)


class Gemma3(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = LanguageModel(config.text)

    @property
    def decoder(self) -> TextDecoder:
        return self.language_model.model

    def __call__(self, ids: mx.array, cache: list | None = None,
                 pixel_values: mx.array | None = None) -> mx.array:
        """Token ids [B, L] in, logits [B, L, vocab] out (the mlx-lm convention)."""
        return self.logits(self.hidden(ids, cache, pixel_values))

    def hidden(self, ids: mx.array, cache: list | None = None,
               pixel_values: mx.array | None = None) -> mx.array:
        """Final hidden states [B, L, hidden]: the engine takes logits of the last one only."""
        if pixel_values is not None:
            raise ValueError("this model has no vision tower; it takes text only")
        return self.decoder(self.decoder.embed(ids), cache)

    def logits(self, h: mx.array) -> mx.array:
        return self.decoder.logits(h)

    def make_cache(self) -> list:
        return self.decoder.make_cache()
