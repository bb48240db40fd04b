"""Tiny random Gemma 3 checkpoints on disk, laid out as the real ones, for tests that start real
processes (the server, the CLI). They carry the 270M's tokenizer and, unless told otherwise,
the official chat template (which the 270M, a base model, lacks).

Weights: the embedding drawn small and everything else at unit scale, as in test_chat, so that
a reply depends on the whole context and images change it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from gemma_mlx.config import ModelConfig
from gemma_mlx.model.gemma3 import Gemma3
from gemma_mlx.prompt import CHAT_TEMPLATE

TEXT = dict(
    model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=262144,
    sliding_window=16, sliding_window_pattern=2, query_pre_attn_scalar=32,
    max_position_embeddings=512, rms_norm_eps=1e-6, torch_dtype="float32",
)
VISION = dict(
    image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=64,
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def config(vision: bool = True, **text) -> dict:
    text_config = {**TEXT, **text}
    if not vision:
        return text_config
    return dict(model_type="gemma3", text_config={**text_config, "vocab_size": 262208},
                vision_config=VISION, mm_tokens_per_image=4, image_token_index=262144,
                boi_token_index=255999, eoi_token_index=256000)


def write_tiny_checkpoint(folder: Path, tokenizer_folder: Path, vision: bool = True,
                          chat_template: bool = True, seed: int = 0, **text) -> Path:
    """A loadable folder: config.json, model.safetensors and the tokenizer files."""
    write_weights(folder, config(vision, **text), seed)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_folder / name, folder / name)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    if chat_template:
        tokenizer_config["chat_template"] = CHAT_TEMPLATE
    else:
        tokenizer_config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def write_weights(folder: Path, cfg: dict, seed: int = 0) -> Path:
    """config.json and model.safetensors of a random model with this config (no tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    net = Gemma3(ModelConfig.from_dict(cfg))
    mx.random.seed(seed)
    weights = {k: mx.random.normal(v.shape) * (0.2 if "embed_tokens" in k else 1.0)
               for k, v in tree_flatten(net.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder
