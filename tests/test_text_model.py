"""Our text decoder against mlx-lm's Gemma 3 (an independent implementation) on the same weights."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import TINY_TEXT, tiny_text_config_new_style
from mlx.utils import tree_flatten
from mlx_lm.models import gemma3_text as reference

from gemma_mlx.config import ModelConfig
from gemma_mlx.model.gemma3 import Gemma3

SMALL_VOCAB = {**TINY_TEXT, "vocab_size": 1000}


def reference_model(config: dict) -> reference.Model:
    model = reference.Model(reference.ModelArgs.from_dict(config))
    model.sanitize({})  # ties the head to the embedding
    weights = {k: mx.random.normal(v.shape) * 0.2 for k, v in tree_flatten(model.parameters())}
    model.load_weights(list(weights.items()))
    return model


def ours_from(ref: reference.Model, config: dict) -> Gemma3:
    net = Gemma3(ModelConfig.from_dict(config))
    net.load_weights([("language_model." + k, v) for k, v in tree_flatten(ref.parameters())])
    return net


IDS = mx.array([[2, 5, 7, 9, 11, 13, 17, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 99]])


@pytest.mark.parametrize("style", ["original", "transformers5"])
def test_logits_equal_mlx_lm_for_both_config_styles(style):
    ref = reference_model(SMALL_VOCAB)
    ours_cfg = SMALL_VOCAB if style == "original" else {**tiny_text_config_new_style(),
                                                        "vocab_size": 1000}
    ours = ours_from(ref, ours_cfg)
    expected, got = ref(IDS), ours(IDS)
    assert got.shape == (1, IDS.shape[1], 1000)
    assert mx.abs(expected - got).max().item() < 1e-4  # same fp32 ops, different op order


def test_new_style_config_reads_like_original():
    a = ModelConfig.from_dict(SMALL_VOCAB).text
    b = ModelConfig.from_dict({**tiny_text_config_new_style(), "vocab_size": 1000}).text
    assert a == b
    assert a.layer_types == ["sliding_attention", "full_attention"] * 2
    assert a.rope_global_scale == 8.0 and a.rope_local_base == 10_000.0


def test_chunked_decode_with_caches_matches_full_forward():
    """Prefill in two chunks then decode one token at a time, past the sliding window (8):
    the rotating caches must give the same logits as one full pass."""
    ref = reference_model(SMALL_VOCAB)
    ours = ours_from(ref, SMALL_VOCAB)
    full = ours(IDS)
    cache = ours.make_cache()
    parts = [ours(IDS[:, :5], cache), ours(IDS[:, 5:12], cache)]
    parts += [ours(IDS[:, i:i + 1], cache) for i in range(12, IDS.shape[1])]
    assert mx.abs(mx.concatenate(parts, axis=1) - full).max().item() < 1e-4
    ref_cache = ref.make_cache()
    ref_parts = [ref(IDS[:, :5], ref_cache), ref(IDS[:, 5:12], ref_cache)]
    ref_parts += [ref(IDS[:, i:i + 1], ref_cache) for i in range(12, IDS.shape[1])]
    assert mx.abs(mx.concatenate(ref_parts, axis=1) - full).max().item() < 1e-4


def test_quantized_model_equals_mlx_lm_quantized():
    ref = reference_model(SMALL_VOCAB)
    ours = ours_from(ref, SMALL_VOCAB)
    nn.quantize(ref, group_size=32, bits=4)
    nn.quantize(ours, group_size=32, bits=4)
    assert isinstance(ours.decoder.embed_tokens, nn.QuantizedEmbedding)
    assert mx.abs(ref(IDS) - ours(IDS)).max().item() < 1e-4


def test_output_head_is_the_embedding():
    ours = ours_from(reference_model(SMALL_VOCAB), SMALL_VOCAB)
    names = [k for k, _ in tree_flatten(ours.parameters())]
    assert not any("lm_head" in k for k in names)
    h = mx.random.normal((1, 1, 64))
    assert mx.allclose(ours.logits(h), h @ ours.decoder.embed_tokens.weight.T, atol=1e-5)


@pytest.mark.parametrize("dtype,scale", [("bfloat16", 50.5), ("float32", 2560**0.5)])
def test_embedding_scale_rounded_to_the_checkpoint_dtype(dtype, scale):
    """transformers rounds sqrt(hidden) to the checkpoint's dtype (50.5 in bf16 for 2560),
    whatever dtype we compute in (float32 here)."""
    cfg = ModelConfig.from_dict({**SMALL_VOCAB, "hidden_size": 2560, "num_hidden_layers": 1,
                                 "intermediate_size": 64, "torch_dtype": dtype})
    net = Gemma3(cfg)
    net.decoder.embed_tokens.weight = mx.ones((1000, 2560))
    assert net.decoder.embed(mx.array([[1]]))[0, 0, 0].item() == pytest.approx(scale, rel=1e-7)


def test_real_270m_logits_equal_mlx_lm(folder_270m, model_270m):
    """The imported 270M, loaded by mlx-lm and by us from the same folder."""
    from mlx_lm.utils import load_model

    ref, _ = load_model(Path(folder_270m))
    ref.set_dtype(mx.float32)  # we compute in float32 on the CPU; so must the reference
    ids = mx.array([model_270m.tokenizer.encode("The capital of France is Paris. The capital")])
    expected, got = ref(ids), model_270m(ids)
    assert got.shape == expected.shape == (1, ids.shape[1], 262144)
    scale = mx.abs(expected).max().item()
    assert mx.abs(expected - got).max().item() < 1e-3 * scale
    assert (mx.argmax(expected, -1) == mx.argmax(got, -1)).all().item()
