"""The Gemma 3 vision side: the SigLIP encoder and the projector into the text model's space.

SigLIP (So400m/14 at 896px): the image is cut into 14x14 patches by a strided conv, each patch
gets a learned position embedding, and a stack of pre-LayerNorm transformer blocks (bidirectional
attention, gelu-tanh MLP) encodes them; a final LayerNorm closes it. There is no pooling head.
The projector then average-pools the 64x64 patch grid down to 16x16 = 256 soft tokens, applies
Gemma's RMSNorm and a linear map into the text hidden size.

Parameter names follow Google's original checkpoints (and mlx-vlm), so
`vision_tower.vision_model.*` and `multi_modal_projector.*` load without renaming;
`sanitize_vision_weights` brings the other layouts onto these names.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import VisionConfig
from .text import RMSNorm


class VisionAttention(nn.Module):
    """Plain multi-head self-attention with biases; every patch sees every patch."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.scale = (dim // n_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=True)
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (p(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu_approx(self.fc1(x)))  # gelu_pytorch_tanh in the HF config


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = VisionAttention(dim, cfg.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = VisionMLP(dim, cfg.intermediate_size)

    def __call__(self, h: mx.array) -> mx.array:
        h = h + self.self_attn(self.layer_norm1(h))
        return h + self.mlp(self.layer_norm2(h))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]

    def __call__(self, h: mx.array) -> mx.array:
        for layer in self.layers:
            h = layer(h)
        return h


class VisionEmbeddings(nn.Module):
    """Non-overlapping patches through a strided conv, plus one learned vector per position."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size,
                                         kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                         bias=True)
        self.num_positions = (cfg.image_size // cfg.patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_positions, cfg.hidden_size)

    def __call__(self, pixels_nhwc: mx.array) -> mx.array:
        patches = self.patch_embedding(pixels_nhwc)  # [N, H/p, W/p, D], row-major patch order
        patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        return patches + self.position_embedding(mx.arange(self.num_positions))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, pixels_nhwc: mx.array) -> mx.array:
        return self.post_layernorm(self.encoder(self.embeddings(pixels_nhwc)))


class VisionTower(nn.Module):
    """pixel_values [N, 3, H, W] (channels first, as the reference processor makes them) in,
    patch features [N, (H/14)*(W/14), hidden] out: [N, 4096, 1152] at 896x896."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = SiglipVisionTransformer(cfg)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        c, size = self.cfg.num_channels, self.cfg.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (c, size, size):
            raise ValueError(f"pixel_values must be [N, {c}, {size}, {size}], "
                             f"got {list(pixel_values.shape)}")
        # Like transformers, run at the weights' dtype (the conv is never quantized).
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        return self.vision_model(pixel_values.transpose(0, 2, 3, 1).astype(dtype))


class MultiModalProjector(nn.Module):
    """Patch features [N, P*P, vision_hidden] -> soft tokens [N, T*T, text_hidden].

    The P x P patch grid is average-pooled with kernel = stride = P // T (T = sqrt of
    mm_tokens_per_image), exactly as torch's AvgPool2d does it: a ragged edge is dropped."""

    def __init__(self, vision_cfg: VisionConfig, text_hidden: int, mm_tokens_per_image: int):
        super().__init__()
        dim = vision_cfg.hidden_size
        self.mm_input_projection_weight = mx.zeros((dim, text_hidden))
        self.mm_soft_emb_norm = RMSNorm(dim, vision_cfg.layer_norm_eps)
        self.patches_per_side = vision_cfg.image_size // vision_cfg.patch_size
        tokens_per_side = int(mm_tokens_per_image**0.5)
        self.kernel = self.patches_per_side // tokens_per_side

    def __call__(self, features: mx.array) -> mx.array:
        pooled = self.pool(features)
        normed = self.mm_soft_emb_norm(pooled)
        return (normed @ self.mm_input_projection_weight).astype(features.dtype)

    def pool(self, features: mx.array) -> mx.array:
        N, _, D = features.shape
        P, k = self.patches_per_side, self.kernel
        out = P // k
        grid = features.reshape(N, P, P, D)[:, : out * k, : out * k]
        # Sum in float32, then back to the input dtype, as torch's pooling does for bf16.
        blocks = grid.astype(mx.float32).reshape(N, out, k, out, k, D)
        return blocks.mean(axis=(2, 4)).reshape(N, out * out, D).astype(features.dtype)


# Vision keys as found in each checkpoint layout -> ours. Google's original and mlx-community
# files already use ours; transformers>=5 prefixes `model.` and drops `vision_model.`.
_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
)


def sanitize_vision_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Rename vision tower and projector keys onto this module's names and put the patch conv
    in MLX's [out, kh, kw, in] layout; every other key passes through unchanged.

    The conv layout is read from the shape (the input-channel axis is the one of size 3), so
    already-converted mlx-community weights are left alone. A SigLIP pooling head, which
    Gemma 3 does not use, is dropped."""
    out = {}
    for key, value in weights.items():
        key = rename_vision_key(key)
        if key.startswith("vision_tower.vision_model.head."):
            continue
        if key == "vision_tower.vision_model.embeddings.patch_embedding.weight":
            value = _conv_to_mlx(value)
        out[key] = value
    return out


def rename_vision_key(key: str) -> str:
    """A vision tower or projector key of any known layout, under our name."""
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _conv_to_mlx(w: mx.array) -> mx.array:
    if w.ndim != 4:
        raise ValueError(f"patch_embedding.weight must be 4-D, got shape {list(w.shape)}")
    if w.shape[-1] == 3:  # already [out, kh, kw, in]
        return w
    if w.shape[1] == 3:  # torch [out, in, kh, kw]
        return w.transpose(0, 2, 3, 1)
    raise ValueError(f"patch_embedding.weight has no 3-channel axis: shape {list(w.shape)}")
