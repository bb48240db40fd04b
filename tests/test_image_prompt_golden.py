"""The whole model on a prompt with two images, against transformers' own logits.

The fixture (tests/fixtures/gemma3_golden/, written by make_gemma3_golden.py) is a tiny random
Gemma 3 with a vision tower, saved by transformers 5 `save_pretrained`, plus transformers'
float32 eager logits for: bos, text, image, text, image, text (55 tokens). Each image is 16 soft
tokens and the sliding window is 8, so the window cuts through both images and bounds how far
back an image token sees inside its own image: transformers' sliding layers allow
AND(window, OR(causal, same image block)), its global layers OR(causal, same image block).

Tolerance: atol 1e-5 on logits of standard deviation 1.8 and maximum |10.8| (float32 ulp at 8
to 16 is 9.5e-7). Both sides compute in float32 with different kernels and summation orders
(torch's eager attention against MLX's SDPA, torch's conv against MLX's); measured max |diff|:
5.5e-6 for the full pass and for every chunking below, a few ulps of the largest logits (feeding
transformers' own soft tokens instead of ours: 5.1e-6, so it is the decoder's rounding).
A real mistake moves logits by 0.1 or more:
- the rule before issue 9, which ORed the image block in after the window (so image tokens saw
  their whole image, however far back): 0.76 from the golden logits (`OLD_RULE_GAP`);
- causal-only attention, transformers' own logits for the same prompt with token_type_ids all
  zero (what mlx-vlm 0.7.10 does): 3.8.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import RotatingKVCache

from gemma_mlx.engine import prefill
from gemma_mlx.loading import Model, load_net
from gemma_mlx.model import gemma3
from gemma_mlx.model.decode import compiled_decode

FIXTURE = Path(__file__).parent / "fixtures" / "gemma3_golden"
ATOL = 1e-5
CAUSAL_GAP = 0.5  # the golden and causal-only logits must differ by more than this (they: 3.8)
OLD_RULE_GAP = 0.1  # ... and the old window rule's (0.76)
IMAGE_BLOCK_MASKS = gemma3.image_block_masks  # the rule under test (the old one wraps it)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "golden.npz") as g:
        return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def net():
    net, quantization = load_net(FIXTURE, quantize=None, dtype="float32")
    assert quantization is None
    return net


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def image_blocks(ids: np.ndarray, image_token: int) -> list[tuple[int, int]]:
    """(start, end) of each run of image soft tokens."""
    blocks, start = [], None
    for i, t in enumerate([*ids.tolist(), -1]):
        if t == image_token and start is None:
            start = i
        elif t != image_token and start is not None:
            blocks.append((start, i))
            start = None
    return blocks


def old_window_rule(is_image: mx.array, cache: list | None, cfg) -> tuple:
    """The sliding mask as it was before issue 9: (window AND causal) OR same image block."""
    global_mask, sliding_mask = IMAGE_BLOCK_MASKS(is_image, cache, cfg)
    L = is_image.shape[0]
    starts = is_image & ~mx.concatenate([mx.array([False]), is_image[:-1]])
    block = mx.where(is_image, mx.cumsum(starts.astype(mx.int32)), -1)
    same_block = (block[:, None] == block[None, :]) & (block[:, None] >= 0)
    past = mx.zeros((L, sliding_mask.shape[-1] - L), dtype=mx.bool_)
    return global_mask, sliding_mask | mx.concatenate([past, same_block], axis=-1)


def test_fixture_is_what_the_tests_assume(net, golden):
    cfg = net.config
    ids = golden["input_ids"][0]
    assert cfg.text.layer_types == ["sliding_attention", "sliding_attention", "full_attention",
                                    "sliding_attention"]
    assert cfg.text.sliding_window == 8 and cfg.text.rope_global_scale == 8.0
    assert cfg.mm_tokens_per_image == 16 > cfg.text.sliding_window  # the window bounds images
    assert (cfg.image_token_index, cfg.boi_token_index, cfg.eoi_token_index) == (500, 498, 499)
    blocks = image_blocks(ids, cfg.image_token_index)
    assert [e - s for s, e in blocks] == [cfg.mm_tokens_per_image] * 2
    assert blocks[1][0] - blocks[0][1] > cfg.text.sliding_window  # the window cuts through
    np.testing.assert_array_equal(golden["token_type_ids"][0], ids == cfg.image_token_index)
    assert max_diff(golden["logits"], golden["logits_causal"]) > CAUSAL_GAP


def test_full_pass_matches_transformers(net, golden):
    logits = net(mx.array(golden["input_ids"]), pixel_values=mx.array(golden["pixel_values"]))
    assert logits.dtype == mx.float32 and logits.shape == golden["logits"].shape
    diff = max_diff(logits, golden["logits"])
    assert diff < ATOL, f"max |ours - transformers| = {diff}"
    # Not what transformers does without the image-block attention (what mlx-vlm does):
    assert max_diff(logits, golden["logits_causal"]) > CAUSAL_GAP


def test_the_old_window_rule_is_caught(net, golden, monkeypatch):
    """The test can fail: with the image block ORed in after the window (the rule before
    issue 9), the logits are 0.76 from transformers', full pass and chunked alike."""
    monkeypatch.setattr(gemma3, "image_block_masks", old_window_rule)
    logits = net(mx.array(golden["input_ids"]), pixel_values=mx.array(golden["pixel_values"]))
    assert max_diff(logits, golden["logits"]) > OLD_RULE_GAP
    features = net.encode_images(mx.array(golden["pixel_values"]))
    ids = golden["input_ids"][0]
    (s1, _), _ = image_blocks(ids, net.config.image_token_index)
    cache = net.make_cache()
    net(mx.array(ids[None, :s1]), cache)  # the cache holds the text before the first image
    h = net.hidden(mx.array(ids[None, s1:]), cache, features)
    assert max_diff(net.logits(h), golden["logits"][:, s1:]) > OLD_RULE_GAP


def splits(ids: np.ndarray, image_token: int) -> dict[str, list[int]]:
    (s1, e1), (s2, e2) = image_blocks(ids, image_token)
    return {
        # chunks that begin with an image, onto a cache holding the text before it (7 tokens;
        # then 32, so the sliding layers' rotating caches have wrapped)
        "at_image_starts": [s1, s2],
        # chunks that end with an image, and one that is a single image-free token
        "after_images": [e1, e2, len(ids) - 1],
        # an image-only chunk between two text chunks
        "image_alone": [s1, e1],
    }


@pytest.mark.parametrize("split", ["at_image_starts", "after_images", "image_alone"])
def test_chunked_prefill_with_cache_matches_transformers(net, golden, split):
    ids = golden["input_ids"][0]
    image_token, per_image = net.config.image_token_index, net.config.mm_tokens_per_image
    features = net.encode_images(mx.array(golden["pixel_values"]))
    bounds = [0, *splits(ids, image_token)[split], len(ids)]
    cache = net.make_cache()
    images_done = 0
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        chunk = ids[start:end]
        n_images = int((chunk == image_token).sum()) // per_image
        chunk_features = features[images_done:images_done + n_images] if n_images else None
        images_done += n_images
        logits = net.logits(net.hidden(mx.array(chunk)[None], cache, chunk_features))
        diff = max_diff(logits, golden["logits"][:, start:end])
        assert diff < ATOL, f"chunk [{start}, {end}): max |ours - transformers| = {diff}"
    assert images_done == 2


def test_image_after_compiled_decode_steps_matches_transformers(net, golden):
    """As in a chat's next turn: the text before the second image read one token at a time by
    the compiled step (which lays the sliding caches out as rings of `window` slots, here
    wrapped), then the image chunk prefilled onto those caches."""
    ids = golden["input_ids"][0]
    (s1, e1), (s2, _) = image_blocks(ids, net.config.image_token_index)
    features = net.encode_images(mx.array(golden["pixel_values"]))
    cache = net.make_cache()
    logits = net.logits(net.hidden(mx.array(ids[None, :e1]), cache, features[:1]))
    assert max_diff(logits, golden["logits"][:, :e1]) < ATOL
    fast = compiled_decode(net.decoder, cache)
    assert fast is not None
    for i in range(e1, s2):
        diff = max_diff(fast.step(mx.array(ids[i:i + 1]), cache), golden["logits"][0, i])
        assert diff < ATOL, f"step {i}: max |ours - transformers| = {diff}"
    assert any(isinstance(c, RotatingKVCache) and c.offset > c.max_size for c in cache)
    logits = net.logits(net.hidden(mx.array(ids[None, s2:]), cache, features[1:]))
    diff = max_diff(logits, golden["logits"][:, s2:])
    assert diff < ATOL, f"image chunk after compiled steps: max |ours - transformers| = {diff}"


@pytest.mark.parametrize("chunk", [3, 8, 20, 55])
def test_engine_prefill_matches_transformers(net, golden, chunk):
    """The engine's own chunking (it moves a boundary that would cut an image; a chunk of 3 or
    8 is shorter than an image, so an image chunk is longer than asked)."""
    model = Model(net, tokenizer=None, path=FIXTURE, quantization=None)
    features = net.encode_images(mx.array(golden["pixel_values"]))
    last = prefill(model, golden["input_ids"][0].tolist(), net.make_cache(), chunk=chunk,
                   image_features=features)
    assert max_diff(last, golden["logits"][0, -1]) < ATOL


def test_mlx_vlm_omits_the_image_block_attention(net, golden):
    """mlx-vlm 0.7.10's Gemma 3, given the same weights, attends causally over image tokens too:
    it reproduces transformers' causal-only logits, not the golden ones. (Its config cannot read
    the transformers 5 style, so it is built here; its post-LayerNorm eps, 1e-5 instead of the
    config's 1e-6, is set right so that only the mask differs.)"""
    import mlx_vlm.models.gemma3 as vlm

    text, vision = net.config.text, net.config.vision
    tcfg = vlm.TextConfig.from_dict({
        "model_type": "gemma3_text", "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "intermediate_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads, "head_dim": text.head_dim,
        "num_key_value_heads": text.num_key_value_heads, "vocab_size": text.vocab_size,
        "query_pre_attn_scalar": text.query_pre_attn_scalar,
        "sliding_window": text.sliding_window, "sliding_window_pattern": 3,
        "rope_scaling": {"rope_type": "linear", "factor": text.rope_global_scale},
        "mm_tokens_per_image": net.config.mm_tokens_per_image,
    })
    vcfg = vlm.VisionConfig.from_dict({**vision.__dict__, "model_type": "siglip_vision_model"})
    ref = vlm.Model(vlm.ModelConfig(text_config=tcfg, vision_config=vcfg, model_type="gemma3",
                                    hidden_size=text.hidden_size, vocab_size=text.vocab_size,
                                    image_token_index=net.config.image_token_index))
    weights = dict(tree_flatten(net.parameters()))
    weights["language_model.lm_head.weight"] = weights["language_model.model.embed_tokens.weight"]
    ref.load_weights(list(weights.items()), strict=True)
    ref.vision_tower.vision_model.post_layernorm.eps = vision.layer_norm_eps

    ids = mx.array(golden["input_ids"])
    embedded = ref.get_input_embeddings(ids, mx.array(golden["pixel_values"]),
                                        mask=mx.ones(ids.shape))
    # As mlx-vlm's generate calls it: no mask, so its own causal (and windowed) masks.
    logits = ref.language_model(ids, inputs_embeds=embedded.inputs_embeds).logits
    assert max_diff(logits, golden["logits_causal"]) < ATOL
    assert max_diff(logits, golden["logits"]) > CAUSAL_GAP
