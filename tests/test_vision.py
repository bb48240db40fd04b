"""Parity of our SigLIP tower and projector with transformers (a committed golden fixture) and
with mlx-vlm's, on the same random weights.

The source of truth is transformers: `test_matches_transformers_golden` compares against the
outputs tests/fixtures/make_gemma3_golden.py saved (no torch needed to run it).

mlx-vlm is an independent MLX port of the same transformers code. Both run in float32 on the
same MLX kernels (conv, LayerNorm, SDPA, matmul) in the same order, and with mlx 0.32 the
outputs are bit-identical. We allow atol = rtol = 1e-6 (about 8 float32 ulps at 1.0, outputs
here are of order 1) so that a harmless reordering (e.g. our reshape-mean pooling against
AvgPool2d) in a later MLX cannot fail the test, while any real difference (a wrong GELU variant,
head split, position order or pooling order) moves the outputs by 1e-3 or more.

mlx-vlm 0.7.10 builds its post-LayerNorm with MLX's default eps 1e-5 while transformers (and
we) use the config's 1e-6; the tests set mlx-vlm's to the config value so that they compare the
rest, and `test_mlx_vlm_post_layernorm_eps_differs` pins that one known difference.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx_vlm.models.gemma3 as vlm  # a dev dependency
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from gemma_mlx.config import ModelConfig, VisionConfig
from gemma_mlx.loading import read_config, read_weights
from gemma_mlx.model.vision import MultiModalProjector, VisionTower, sanitize_vision_weights

TOL = dict(atol=1e-6, rtol=1e-6)
GOLDEN = Path(__file__).parent / "fixtures" / "gemma3_golden"
TEXT_HIDDEN = 48


def tiny_config(**over) -> VisionConfig:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, image_size=56, patch_size=14)
    return VisionConfig(**{**base, **over})


def randomize(module, seed: int) -> dict[str, mx.array]:
    """Give every parameter random values of unit-ish scale (norm weights around 1)."""
    mx.random.seed(seed)
    params = {}
    for name, p in tree_flatten(module.parameters()):
        scale = 1.0 if name.endswith(("embedding.weight", "norm1.weight", "norm2.weight")) else 0.2
        params[name] = mx.random.normal(p.shape) * scale
    module.update(tree_unflatten(list(params.items())))
    mx.eval(module.parameters())
    return params


def vlm_vision_config(cfg: VisionConfig):
    return vlm.VisionConfig.from_dict({**cfg.__dict__, "model_type": "siglip_vision_model"})


def reference_models(cfg: VisionConfig, tokens: int):
    vcfg = vlm_vision_config(cfg)
    tcfg = vlm.TextConfig.from_dict({"model_type": "gemma3_text", "hidden_size": TEXT_HIDDEN,
                                     "num_hidden_layers": 1, "intermediate_size": 8,
                                     "mm_tokens_per_image": tokens})
    mcfg = vlm.ModelConfig(text_config=tcfg, vision_config=vcfg, model_type="gemma3")
    tower = vlm.VisionModel(vcfg)
    tower.vision_model.post_layernorm.eps = cfg.layer_norm_eps  # see the module docstring
    projector = vlm.gemma3.Gemma3MultiModalProjector(mcfg)
    return tower, projector


def build_pair(cfg: VisionConfig, tokens: int, seed: int = 0):
    tower, projector = VisionTower(cfg), MultiModalProjector(cfg, TEXT_HIDDEN, tokens)
    ref_tower, ref_projector = reference_models(cfg, tokens)
    ref_tower.load_weights(list(randomize(tower, seed).items()), strict=True)
    ref_projector.load_weights(list(randomize(projector, seed + 1).items()), strict=True)
    return (tower, projector), (ref_tower, ref_projector)


def pixels(cfg: VisionConfig, n: int = 2, seed: int = 7) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array(rng.uniform(-1, 1, (n, 3, cfg.image_size, cfg.image_size)), mx.float32)


def run_ours(tower, projector, px):
    features = tower(px)
    return features, projector(features)


def run_reference(tower, projector, px):
    features = tower(px.transpose(0, 2, 3, 1))[0]  # mlx-vlm takes NHWC, returns a tuple
    return features, projector(features)


@pytest.mark.parametrize("image_size,patch,tokens", [(56, 14, 4), (56, 14, 16), (70, 14, 4)])
def test_tower_and_projector_match_mlx_vlm(image_size, patch, tokens):
    # 4x4 patches pooled 2x2; 4x4 patches not pooled (kernel 1); 5x5 patches, kernel 2: the
    # ragged last row and column are dropped by both.
    cfg = tiny_config(image_size=image_size, patch_size=patch)
    ours, ref = build_pair(cfg, tokens)
    px = pixels(cfg)
    f, out = run_ours(*ours, px)
    rf, rout = run_reference(*ref, px)
    assert f.shape == (2, (image_size // patch) ** 2, cfg.hidden_size)
    assert out.shape == rout.shape == (2, tokens, TEXT_HIDDEN)
    np.testing.assert_allclose(np.array(f), np.array(rf), **TOL)
    np.testing.assert_allclose(np.array(out), np.array(rout), **TOL)


def test_real_geometry_one_layer():
    """896px, patch 14 -> 4096 patches -> 4x4 pooling -> 256 tokens, as in the 4B+ models."""
    cfg = tiny_config(image_size=896, num_hidden_layers=1)
    ours, ref = build_pair(cfg, 256)
    px = pixels(cfg, n=1)
    f, out = run_ours(*ours, px)
    rf, rout = run_reference(*ref, px)
    assert f.shape == (1, 4096, 32) and out.shape == (1, 256, TEXT_HIDDEN)
    np.testing.assert_allclose(np.array(f), np.array(rf), **TOL)
    np.testing.assert_allclose(np.array(out), np.array(rout), **TOL)


def test_pooling_order_is_row_major():
    """Token t covers patch rows 4*(t // 16) .. +3 and columns 4*(t % 16) .. +3, as the
    reference's [B, D, 64, 64] grid + AvgPool2d + flatten(2) gives."""
    cfg = VisionConfig(hidden_size=1, image_size=896, patch_size=14)
    projector = MultiModalProjector(cfg, 1, 256)
    grid = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    pooled = np.array(projector.pool(mx.array(grid.reshape(1, 4096, 1))))[0, :, 0]
    expected = grid.reshape(16, 4, 16, 4).mean(axis=(1, 3)).reshape(256)
    np.testing.assert_array_equal(pooled, expected)


def test_mlx_vlm_post_layernorm_eps_differs():
    """If mlx-vlm fixes this, the eps override in reference_models can go."""
    assert vlm.VisionModel(vlm_vision_config(tiny_config())).vision_model.post_layernorm.eps \
        == 1e-5
    assert VisionTower(tiny_config()).vision_model.post_layernorm.eps == 1e-6


def test_bf16_weights_run_in_bf16():
    cfg = tiny_config()
    tower, projector = VisionTower(cfg), MultiModalProjector(cfg, TEXT_HIDDEN, 4)
    randomize(tower, 0)
    randomize(projector, 1)
    tower.set_dtype(mx.bfloat16)
    projector.set_dtype(mx.bfloat16)
    f32 = pixels(cfg)
    features = tower(f32)
    out = projector(features)
    assert features.dtype == out.dtype == mx.bfloat16


def test_wrong_pixel_shape_is_refused():
    cfg = tiny_config()
    with pytest.raises(ValueError, match=r"\[N, 3, 56, 56\]"):
        VisionTower(cfg)(mx.zeros((1, 56, 56, 3)))


def torch_layout(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    return {k: (v.transpose(0, 3, 1, 2) if k.endswith("patch_embedding.weight") else v)
            for k, v in weights.items()}


def full_model_weights(seed: int = 0) -> dict[str, mx.array]:
    cfg = tiny_config()
    tower, projector = VisionTower(cfg), MultiModalProjector(cfg, TEXT_HIDDEN, 4)
    w = {f"vision_tower.{k}": v for k, v in randomize(tower, seed).items()}
    w.update({f"multi_modal_projector.{k}": v for k, v in randomize(projector, 1).items()})
    return w


def assert_same(a: dict[str, mx.array], b: dict[str, mx.array]):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)


def test_sanitize_google_original_layout():
    ours = full_model_weights()
    google = torch_layout(ours)
    google["language_model.model.norm.weight"] = mx.zeros((4,))
    expected = {**ours, "language_model.model.norm.weight": google[
        "language_model.model.norm.weight"]}
    assert_same(sanitize_vision_weights(google), expected)


def test_sanitize_mlx_community_layout_is_left_alone():
    ours = full_model_weights()
    assert_same(sanitize_vision_weights(ours), ours)


def test_sanitize_transformers_v5_layout():
    ours = full_model_weights()
    v5 = {}
    for k, v in torch_layout(ours).items():
        k = k.replace("vision_tower.vision_model.", "model.vision_tower.")
        k = k.replace("multi_modal_projector.", "model.multi_modal_projector.")
        v5[k] = v
    v5["model.vision_tower.head.probe"] = mx.zeros((1, 1, 32))  # a SigLIP head Gemma drops
    assert_same(sanitize_vision_weights(v5), ours)


def test_sanitized_weights_load_strictly():
    cfg = tiny_config()
    ours = full_model_weights()
    tower = VisionTower(cfg)
    w = sanitize_vision_weights(torch_layout(ours))
    prefix = "vision_tower."
    tower.load_weights([(k[len(prefix):], v) for k, v in w.items() if k.startswith(prefix)],
                       strict=True)


def test_matches_transformers_golden():
    """The source of truth: transformers' SiglipVisionModel and Gemma3MultiModalProjector
    outputs for the golden fixture (tests/fixtures/make_gemma3_golden.py: 112px, patch 14,
    hidden 32, 2 layers, 16 soft tokens per image, weights saved by transformers 5 with the
    patch conv in torch's layout), on its two images.

    Both sides compute in float32 with different kernels (torch's conv, LayerNorm and attention
    against MLX's). Measured: 1.6e-6 on the tower's output (values up to |4.0|, a few ulps) and
    3.3e-6 on the projector's (up to |12.8|, ulp 9.5e-7). The tolerances leave a 3x margin;
    the post-LayerNorm eps of 1e-5 instead of 1e-6 moves the tower's output by 1.1e-5, exact
    GELU instead of tanh by 9e-4."""
    config = ModelConfig.from_dict(read_config(GOLDEN))
    weights = sanitize_vision_weights(read_weights(GOLDEN))
    tower = VisionTower(config.vision)
    projector = MultiModalProjector(config.vision, config.text.hidden_size,
                                    config.mm_tokens_per_image)
    for module, prefix in ((tower, "vision_tower."), (projector, "multi_modal_projector.")):
        module.load_weights([(k[len(prefix):], v) for k, v in weights.items()
                             if k.startswith(prefix)], strict=True)
    with np.load(GOLDEN / "golden.npz") as golden:
        px, hf_f, hf_out = (golden[k] for k in ("pixel_values", "vision_features",
                                                 "image_features"))
    f, out = run_ours(tower, projector, mx.array(px))
    assert f.shape == hf_f.shape == (2, 64, 32) and out.shape == hf_out.shape == (2, 16, 64)
    np.testing.assert_allclose(np.array(f), hf_f, atol=5e-6, rtol=0)
    np.testing.assert_allclose(np.array(out), hf_out, atol=1e-5, rtol=0)
