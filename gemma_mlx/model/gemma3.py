"""The whole Gemma 3 model: the text decoder, and (on 4B+) the SigLIP tower and projector.

An image becomes 256 soft tokens: the projector's vectors replace the embeddings at the image
token positions (they are not scaled by sqrt(hidden), text embeddings are). During prefill the
tokens of one image attend to each other in both directions; everything else is causal. On
sliding layers the window bounds both, also inside an image longer than the window, as
transformers' Gemma 3 does it (`image_block_masks`).

Parameter names follow the mlx-vlm / transformers multimodal layout
(`language_model.model.*`, `vision_tower.*`, `multi_modal_projector.*`); text-only checkpoints
are mapped onto it by the loader.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig, TextConfig
from .text import TextDecoder
from .vision import MultiModalProjector, VisionTower


class LanguageModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = TextDecoder(cfg)


class Gemma3(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = LanguageModel(config.text)
        if config.has_vision:
            self.vision_tower = VisionTower(config.vision)
            self.multi_modal_projector = MultiModalProjector(
                config.vision, config.text.hidden_size, config.mm_tokens_per_image)

    @property
    def decoder(self) -> TextDecoder:
        return self.language_model.model

    def __call__(self, ids: mx.array, cache: list | None = None,
                 pixel_values: mx.array | None = None) -> mx.array:
        """Token ids [B, L] in, logits [B, L, vocab] out (the mlx-lm convention).
        `pixel_values` [n_images, 3, H, W] fill the image token positions, in order."""
        features = self.encode_images(pixel_values) if pixel_values is not None else None
        return self.logits(self.hidden(ids, cache, features))

    def encode_images(self, pixel_values: mx.array) -> mx.array:
        """[n_images, 3, H, W] -> [n_images, mm_tokens_per_image, text hidden]."""
        if not self.config.has_vision:
            raise ValueError("this model has no vision tower; it takes text only")
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def hidden(self, ids: mx.array, cache: list | None = None,
               image_features: mx.array | None = None, eval_layers: bool = False) -> mx.array:
        """Final hidden states [B, L, hidden]: the engine takes logits of the last one only."""
        is_image = ids == self.config.image_token_index
        # The image token may lie past the embedding (a GGUF's vocabulary can stop at 262144):
        # its rows are replaced by the soft tokens anyway, so look up token 0 there instead.
        h = self.decoder.embed(mx.where(is_image, 0, ids))
        masks = None
        if image_features is not None:
            h = merge_image_features(h, is_image, image_features)
        if ids.shape[1] > 1 and self.config.has_vision and is_image.any().item():
            masks = image_block_masks(is_image[0], cache, self.config.text)
        return self.decoder(h, cache, masks, eval_layers)

    def logits(self, h: mx.array) -> mx.array:
        return self.decoder.logits(h)

    def make_cache(self, kv_bits: int | None = None) -> list:
        return self.decoder.make_cache(kv_bits)


def merge_image_features(h: mx.array, is_image: mx.array, features: mx.array) -> mx.array:
    """Put the soft tokens, in order, where the image tokens are (no sqrt(hidden) scaling)."""
    flat = features.reshape(-1, features.shape[-1]).astype(h.dtype)
    n_slots = is_image.sum().item()
    if n_slots != flat.shape[0]:
        raise ValueError(f"the prompt has {n_slots} image tokens but the images give "
                         f"{flat.shape[0]} soft tokens")
    index = mx.maximum(mx.cumsum(is_image.reshape(-1).astype(mx.int32)) - 1, 0)
    merged = mx.where(is_image.reshape(-1)[:, None], flat[index], h.reshape(-1, h.shape[-1]))
    return merged.reshape(h.shape)


def image_block_masks(is_image: mx.array, cache: list | None, cfg: TextConfig) -> tuple[Any, Any]:
    """(global, sliding) boolean masks for a prefill chunk [L] containing image tokens, as
    transformers' `create_masks_for_vision_model` builds them:
    global layers OR(causal, same image block); sliding layers AND(window, OR(causal, same image
    block)), the window one-sided (key > query - window), so it bounds how far back a token
    sees inside an image too.

    The keys are the cached ones (in temporal order, as mlx-lm's caches give them to a
    multi-token update; a rotating cache gives at most window - 1 of them) followed by the
    chunk's own. A chunk never splits an image (engine.prefill's chunking), so image blocks
    pair up only inside the chunk."""
    starts = is_image & ~mx.concatenate([mx.array([False]), is_image[:-1]])
    block = mx.where(is_image, mx.cumsum(starts.astype(mx.int32)), -1)
    global_past = sliding_past = 0
    if cache is not None:
        types = cfg.layer_types
        if "full_attention" in types:
            global_past = cache[types.index("full_attention")].offset
        if "sliding_attention" in types:
            rotating = cache[types.index("sliding_attention")]
            sliding_past = min(rotating.max_size - 1, rotating.offset)
    return (prefill_mask(block, global_past),
            prefill_mask(block, sliding_past, window=cfg.sliding_window))


def prefill_mask(block: mx.array, past: int, window: int | None = None) -> mx.array:
    """allowed [L, past + L] for the chunk's queries over `past` cached keys, then its own:
    (key <= query, or both in one image block) and, with a window, key > query - window.
    `block` [L] numbers the chunk's image blocks (-1 on text); cached keys are in none."""
    L = block.shape[0]
    query = mx.arange(past, past + L)[:, None]
    key = mx.arange(past + L)[None]
    key_block = mx.concatenate([mx.full((past,), -1, dtype=block.dtype), block])
    same_block = (block[:, None] == key_block[None]) & (block[:, None] >= 0)
    allowed = (key <= query) | same_block
    if window is not None:
        allowed = allowed & (key > query - window)
    return allowed
