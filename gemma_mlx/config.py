"""Gemma 3 configuration, read from either config style found on the Hub.

Google's original configs (transformers 4.50 era) say `sliding_window_pattern`, `rope_theta`,
`rope_local_base_freq` and `rope_scaling`; transformers>=5 configs say `layer_types` and
`rope_parameters.{sliding,full}_attention`. Both become the same dataclasses here. Defaults are
transformers' own, because the multimodal configs on the Hub leave most text fields out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass
class TextConfig:
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    vocab_size: int = 262_208
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    max_position_embeddings: int = 131_072
    layer_types: list[str] = field(default_factory=list)
    rope_global_base: float = 1_000_000.0
    rope_local_base: float = 10_000.0
    rope_global_scale: float = 1.0  # linear RoPE scaling factor of the global layers (8 on 4B+)
    # The checkpoint's own dtype: sqrt(hidden) is rounded to it, as in transformers, whatever
    # dtype we compute in.
    dtype: str = "bfloat16"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and d[k] is not None}
        known.pop("layer_types", None)
        known["dtype"] = str(d.get("dtype") or d.get("torch_dtype") or "bfloat16")
        cfg = cls(**known)
        cfg.layer_types = _layer_types(d, cfg.num_hidden_layers)
        cfg.rope_global_base, cfg.rope_global_scale, cfg.rope_local_base = _rope(d)
        return cfg

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def to_hf(self) -> dict[str, Any]:
        """The original (transformers 4.50) style, which every Gemma 3 loader reads."""
        d = asdict(self)
        for k in ("layer_types", "rope_global_base", "rope_local_base", "rope_global_scale",
                  "dtype"):
            d.pop(k)
        d["torch_dtype"] = self.dtype
        d["rope_theta"] = self.rope_global_base
        d["rope_local_base_freq"] = self.rope_local_base
        d["rope_scaling"] = (
            {"rope_type": "linear", "factor": self.rope_global_scale}
            if self.rope_global_scale != 1.0
            else None
        )
        pattern = _pattern_of(self.layer_types)
        if pattern is not None:
            d["sliding_window_pattern"] = pattern
        else:
            d["layer_types"] = list(self.layer_types)
        d["model_type"] = "gemma3_text"
        d["hidden_activation"] = "gelu_pytorch_tanh"
        return d


@dataclass
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 896
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d and d[k] is not None})


@dataclass
class ModelConfig:
    """The whole model: a text decoder, and a vision tower when the checkpoint has one."""

    text: TextConfig
    vision: VisionConfig | None = None
    model_type: str = "gemma3_text"
    mm_tokens_per_image: int = 256
    image_token_index: int = 262_144
    boi_token_index: int = 255_999
    eoi_token_index: int = 256_000
    eos_token_ids: tuple[int, ...] = (1, 106)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type", "gemma3_text")
        if "text_config" in d:
            dtype = d.get("dtype") or d.get("torch_dtype")
            text = TextConfig.from_dict({"torch_dtype": dtype, **(d["text_config"] or {})})
        else:
            text = TextConfig.from_dict(d)
        vision = VisionConfig.from_dict(d["vision_config"]) if d.get("vision_config") else None
        extra = {}
        for name in ("mm_tokens_per_image", "image_token_index", "boi_token_index",
                     "eoi_token_index"):
            alias = name.replace("_index", "_id")
            if d.get(name) is not None:
                extra[name] = d[name]
            elif d.get(alias) is not None:
                extra[name] = d[alias]
        eos = d.get("eos_token_id")
        if eos is not None:
            eos = {eos} if isinstance(eos, int) else set(eos)
            extra["eos_token_ids"] = tuple(sorted(eos | {1, 106}))
        return cls(text=text, vision=vision, model_type=model_type, **extra)

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    def to_hf(self) -> dict[str, Any]:
        """A config.json in the original style (the layout mlx-lm and mlx-vlm read)."""
        if not self.has_vision:
            return self.text.to_hf()
        return {
            "model_type": "gemma3",
            "architectures": ["Gemma3ForConditionalGeneration"],
            "text_config": self.text.to_hf(),
            "vision_config": {**asdict(self.vision), "model_type": "siglip_vision_model",
                              "vision_use_head": False},
            "mm_tokens_per_image": self.mm_tokens_per_image,
            "image_token_index": self.image_token_index,
            "boi_token_index": self.boi_token_index,
            "eoi_token_index": self.eoi_token_index,
            "eos_token_id": list(self.eos_token_ids),
        }


def _layer_types(d: dict[str, Any], n_layers: int) -> list[str]:
    if d.get("layer_types"):
        types = list(d["layer_types"])
        if len(types) != n_layers:
            raise ValueError(f"config lists {len(types)} layer_types for {n_layers} layers")
        return types
    pattern = int(d.get("sliding_window_pattern") or 6)
    return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]


def _rope(d: dict[str, Any]) -> tuple[float, float, float]:
    """(global base, global linear factor, local base) from either config style."""
    params = d.get("rope_parameters") or {}
    full = params.get(FULL) or {}
    sliding = params.get(SLIDING) or {}
    scaling = d.get("rope_scaling") or full
    factor = 1.0
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        factor = float(scaling["factor"])
    global_base = full.get("rope_theta", d.get("rope_theta", 1_000_000.0))
    local_base = sliding.get("rope_theta", d.get("rope_local_base_freq", 10_000.0))
    return float(global_base), factor, float(local_base)


def _pattern_of(layer_types: list[str]) -> int | None:
    """The `sliding_window_pattern` that produces these layer types, if one does."""
    for pattern in range(1, len(layer_types) + 2):
        expected = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(len(layer_types))]
        if expected == layer_types:
            return pattern
    return None
