"""The Gemma 3 text decoder, top to bottom as the paper and transformers describe it.

Each block: pre-norm attention with RMSNorm'd queries and keys, a post-attention norm, then a
pre-norm gelu-tanh gated MLP with a post-MLP norm. Layers alternate between sliding-window
attention (local RoPE base) and global attention (global RoPE base, linear scaling on 4B+).
The output head is the (possibly quantized) embedding matrix itself. (model/decode.py runs the
same computation for one token at a time as one compiled graph; this module knows nothing of it.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from ..config import TextConfig


class RMSNorm(nn.Module):
    """Gemma's RMSNorm scales by (1 + w), so a zero weight is the identity."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.scale = cfg.query_pre_attn_scalar**-0.5
        dim, head_dim = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps)
        if cfg.is_sliding(layer):
            self.rope = nn.RoPE(head_dim, traditional=False, base=cfg.rope_local_base)
        else:
            self.rope = nn.RoPE(head_dim, traditional=False, base=cfg.rope_global_base,
                                scale=1.0 / cfg.rope_global_scale)

    def __call__(self, x: mx.array, mask: Any, cache: Any) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = self.q_norm(q), self.k_norm(k)  # QK-norm comes before RoPE
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attend(q, k, v, cache, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def attend(q: mx.array, k: Any, v: Any, cache: Any, scale: float, mask: Any) -> mx.array:
    """Scaled dot-product attention over the cached keys and values. With a quantized cache,
    one query attends through quantized matmuls (mlx-lm's); a prefill chunk dequantizes the keys
    and values first, for the fused kernel: mlx-lm's quantized path would materialize every
    chunk-by-context score (2048 x 128K x heads), the memory quantizing was meant to save."""
    if isinstance(cache, QuantizedKVCache) and q.shape[2] > 1:
        k = mx.dequantize(*k, group_size=cache.group_size, bits=cache.bits).astype(q.dtype)
        v = mx.dequantize(*v, group_size=cache.group_size, bits=cache.bits).astype(q.dtype)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return scaled_dot_product_attention(q, k, v, cache=cache, scale=scale, mask=mask)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        dim, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(dim, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps)
        self.post_feedforward_layernorm = RMSNorm(dim, eps)

    def __call__(self, h: mx.array, mask: Any, cache: Any) -> mx.array:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class TextDecoder(nn.Module):
    """Token ids (or merged embeddings) in, final hidden states out."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [Block(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def embed(self, ids: mx.array) -> mx.array:
        """Scaled token embeddings. The scale is rounded to the checkpoint's dtype first
        (bf16: 50.5 for 2560), as transformers' scaled embedding does."""
        h = self.embed_tokens(ids)
        scale = mx.array(self.cfg.hidden_size**0.5, getattr(mx, self.cfg.dtype))
        return h * scale.astype(h.dtype)

    def __call__(self, h: mx.array, cache: list | None = None,
                 masks: tuple[Any, Any] | None = None, eval_layers: bool = False) -> mx.array:
        """`h` is [B, L, hidden] embeddings (already scaled); `masks` overrides the
        (global, sliding) masks, which prefill with images needs.

        `eval_layers` (prefill) evaluates block by block, one block queued ahead: a GPU command
        buffer frees its temporaries (attention scores, MLP activations) only when it
        completes, so a graph of all blocks at once holds every block's temporaries together
        (a 4B's 4096-token prefill peaked at 10.4 GB, now 3.2 GB), and waiting on each block
        before building the next would leave the GPU idle in between."""
        cache = cache or [None] * len(self.layers)
        if masks is None:
            masks = self.causal_masks(h, cache)
        global_mask, sliding_mask = masks
        queued = None
        for i, (layer, c) in enumerate(zip(self.layers, cache, strict=True)):
            h = layer(h, sliding_mask if self.cfg.is_sliding(i) else global_mask, c)
            if eval_layers:
                mx.async_eval(h)
                if queued is not None:
                    mx.eval(queued)
                queued = h
        return self.norm(h)

    def causal_masks(self, h: mx.array, cache: list,
                     layers: Sequence[int] | None = None) -> tuple[Any, Any]:
        """The (global, sliding) masks, each from the cache of the first layer of its kind
        among `layers` (all of them by default)."""
        layers = range(len(self.cfg.layer_types)) if layers is None else layers
        first_global = next((i for i in layers if not self.cfg.is_sliding(i)), None)
        first_sliding = next((i for i in layers if self.cfg.is_sliding(i)), None)
        global_mask = sliding_mask = None
        if first_global is not None:
            global_mask = create_attention_mask(h, cache[first_global])
        if first_sliding is not None:
            sliding_mask = create_attention_mask(h, cache[first_sliding],
                                                 window_size=self.cfg.sliding_window)
        return global_mask, sliding_mask

    def logits(self, h: mx.array) -> mx.array:
        """The tied output head: the embedding matrix, quantized or not, used as a linear layer."""
        return self.embed_tokens.as_linear(h)

    def make_cache(self, kv_bits: int | None = None) -> list:
        """Sliding layers keep a ring of `sliding_window` entries; global layers keep every
        token, in the compute dtype or, with `kv_bits` (4 or 8), quantized in groups of 64 as
        mlx-lm does (32 for the head sizes of tiny test configs). Only the
        global layers grow with the context, so only they are quantized (mlx-lm cannot
        quantize its rotating cache either)."""
        def global_cache() -> Any:
            if kv_bits is None:
                return KVCache()
            group = 64 if self.cfg.head_dim % 64 == 0 else 32
            return QuantizedKVCache(group_size=group, bits=kv_bits)

        return [RotatingKVCache(max_size=self.cfg.sliding_window) if self.cfg.is_sliding(i)
                else global_cache() for i in range(self.cfg.num_hidden_layers)]
