"""Shared fixtures: tiny random configs (fast) and the real Gemma 3 270M from PyPI (truth)."""

from __future__ import annotations

import mlx.core as mx
import pytest

TINY_TEXT = dict(
    model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=262144,
    sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=32,
    rope_scaling={"rope_type": "linear", "factor": 8.0}, max_position_embeddings=4096,
    rms_norm_eps=1e-6,
)


def tiny_text_config_new_style() -> dict:
    """TINY_TEXT as transformers>=5 writes it: layer_types and rope_parameters."""
    old_style_only = ("sliding_window_pattern", "rope_scaling")
    cfg = {k: v for k, v in TINY_TEXT.items() if k not in old_style_only}
    cfg["layer_types"] = ["sliding_attention", "full_attention"] * 2
    cfg["rope_parameters"] = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    }
    return cfg


@pytest.fixture(scope="session")
def folder_270m():
    """The PyPI 270M GGUF imported into the cache (once per machine, as a user's first run)."""
    from gemma_mlx.hub import resolve

    return resolve("270m")


@pytest.fixture(scope="session")
def model_270m():
    import gemma_mlx

    return gemma_mlx.load("270m")


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)


@pytest.fixture(scope="session")
def soft_tokenizer(model_270m):
    """The 270M's HF tokenizer plus `<image_soft_token>`, which its vocabulary lacks: it then
    gets id 262144, the config's image_token_index, and tokenizes the processor's expanded
    image text at once, as the 4B+ tokenizer does. A copy: the model's own stays unchanged."""
    import copy

    tokenizer = copy.deepcopy(model_270m.tokenizer._tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    assert tokenizer.convert_tokens_to_ids("<image_soft_token>") == 262144
    return tokenizer
