"""Loading from local folders laid out exactly like the Hub repos, offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import TINY_TEXT
from mlx.utils import tree_flatten

import gemma_mlx
from gemma_mlx.config import ModelConfig
from gemma_mlx.convert import convert
from gemma_mlx.errors import BadCheckpoint, ModelNotFound
from gemma_mlx.model.gemma3 import Gemma3

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


@pytest.fixture(scope="module")
def google_text_folder(tmp_path_factory, folder_270m) -> Path:
    """A tiny random Gemma 3 text checkpoint in Google's original layout (bf16, `model.*`)."""
    folder = tmp_path_factory.mktemp("google-text")
    net = Gemma3(ModelConfig.from_dict(TINY_TEXT))
    weights = {k.replace("language_model.model.", "model.", 1): (mx.random.normal(v.shape) * 0.2)
               .astype(mx.bfloat16) for k, v in tree_flatten(net.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    config = {**TINY_TEXT, "architectures": ["Gemma3ForCausalLM"], "torch_dtype": "bfloat16",
              "eos_token_id": [1, 106], "bos_token_id": 2, "pad_token_id": 0}
    (folder / "config.json").write_text(json.dumps(config))
    copy_tokenizer(folder_270m, folder)
    return folder


IDS = mx.array([[2, 818, 5279, 529, 7001, 563, 9079, 236761, 108]])


def mlx_lm_logits(folder: Path) -> mx.array:
    from mlx_lm.utils import load_model  # the weights only: no tokenizer needed

    model, _ = load_model(Path(folder))
    model.set_dtype(mx.float32)  # we compute in float32 on the CPU; so must the reference
    return model(IDS)


def test_google_layout_unquantized_equals_mlx_lm(google_text_folder):
    model = gemma_mlx.load(str(google_text_folder), quantize=False)
    assert model.quantization is None
    assert not isinstance(model.net.decoder.embed_tokens, nn.QuantizedEmbedding)
    assert mx.allclose(model(IDS), mlx_lm_logits(google_text_folder), atol=1e-2, rtol=1e-2)


def test_google_layout_is_quantized_to_4_bits_on_load(google_text_folder):
    model = gemma_mlx.load(str(google_text_folder))
    assert model.quantization == {"group_size": 64, "bits": 4}
    q_proj = model.net.decoder.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == 4
    assert isinstance(model.net.decoder.embed_tokens, nn.QuantizedEmbedding)
    from mlx_lm.utils import load_model

    reference, _ = load_model(Path(google_text_folder))  # quantized the same way, by mlx-lm
    reference.set_dtype(mx.float32)
    nn.quantize(reference, group_size=64, bits=4)
    assert mx.allclose(model(IDS), reference(IDS), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_our_convert_writes_the_mlx_community_layout(google_text_folder, tmp_path, bits,
                                                     group_size):
    out = convert(str(google_text_folder), tmp_path / "out", bits=bits, group_size=group_size)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == bits
    assert config["quantization"]["group_size"] == group_size
    keys = mx.load(str(out / "model.safetensors")).keys()
    assert "model.layers.0.self_attn.q_proj.scales" in keys  # mlx-lm's text layout
    assert (out / "tokenizer.json").exists()
    ours = gemma_mlx.load(str(out))
    assert ours.quantization["bits"] == bits
    assert mx.allclose(ours(IDS), mlx_lm_logits(out), atol=1e-3, rtol=1e-3)


def test_mlx_lm_convert_output_loads_identically(google_text_folder, tmp_path):
    from mlx_lm import convert as mlx_lm_convert

    out = tmp_path / "mlx-lm"
    mlx_lm_convert(str(google_text_folder), mlx_path=str(out), quantize=True, q_group_size=64,
                   q_bits=4)
    ours = gemma_mlx.load(str(out))
    assert ours.quantization["bits"] == 4
    assert mx.allclose(ours(IDS), mlx_lm_logits(out), atol=1e-3, rtol=1e-3)


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(BadCheckpoint, match="no config.json"):
        gemma_mlx.load(str(tmp_path))


def test_corrupt_safetensors_is_a_clear_error(google_text_folder, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(google_text_folder, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(BadCheckpoint, match="corrupt or truncated"):
        gemma_mlx.load(str(folder))


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ModelNotFound, match="270m, 1b, 4b, 12b, 27b"):
        gemma_mlx.load("gemma-9000")


def offline_hub(monkeypatch, cache: Path) -> None:
    """What HF_HUB_OFFLINE=1 HF_HUB_CACHE=... do (huggingface_hub reads them at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_hub_repo_missing_offline_says_how_to_fix(monkeypatch, tmp_path):
    offline_hub(monkeypatch, tmp_path)
    with pytest.raises(ModelNotFound, match="not in the local Hub cache"):
        gemma_mlx.load("mlx-community/gemma-3-1b-it-qat-4bit")


def test_hub_repo_from_local_hub_cache(monkeypatch, tmp_path, google_text_folder):
    """A repo already in huggingface_hub's cache loads offline, through the real Hub code."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-gemma" / "snapshots" / ("0" * 40)
    shutil.copytree(google_text_folder, snapshot)
    (cache / "models--acme--tiny-gemma" / "refs").mkdir()
    (cache / "models--acme--tiny-gemma" / "refs" / "main").write_text("0" * 40)
    offline_hub(monkeypatch, cache)
    model = gemma_mlx.load("acme/tiny-gemma")
    assert model.path == snapshot
    assert model(IDS).shape == (1, IDS.shape[1], 262144)


TINY_VISION = {
    "model_type": "gemma3",
    "text_config": {**{k: v for k, v in TINY_TEXT.items() if k != "model_type"},
                    "model_type": "gemma3_text", "vocab_size": 262208},
    "vision_config": {"model_type": "siglip_vision_model", "image_size": 28, "patch_size": 14,
                      "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "vision_use_head": False},
    "mm_tokens_per_image": 4, "image_token_index": 262144, "boi_token_index": 255999,
    "eoi_token_index": 256000, "eos_token_id": [1, 106],
}


@pytest.fixture(scope="module")
def google_vision_folder(tmp_path_factory, folder_270m) -> Path:
    """A tiny random multimodal Gemma 3 in Google's original layout: the patch conv in torch's
    [out, in, kh, kw] order, `language_model.model.*` and `vision_tower.vision_model.*` keys."""
    folder = tmp_path_factory.mktemp("google-vision")
    net = Gemma3(ModelConfig.from_dict(TINY_VISION))
    weights = {k: (mx.random.normal(v.shape) * 0.2) for k, v in tree_flatten(net.parameters())}
    conv = "vision_tower.vision_model.embeddings.patch_embedding.weight"
    weights[conv] = weights[conv].transpose(0, 3, 1, 2)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(TINY_VISION))
    copy_tokenizer(folder_270m, folder)
    return folder


def image_prompt_ids() -> mx.array:
    return mx.array([[2, 105, 2364, 107, 255999, *[262144] * 4, 256000, 108, 3689, 106, 107]])


def test_google_vision_layout_and_our_mlx_community_convert_agree(google_vision_folder,
                                                                  tmp_path):
    pixels = mx.random.uniform(-1, 1, (1, 3, 28, 28))
    google = gemma_mlx.load(str(google_vision_folder), quantize=False)
    conv = google.net.vision_tower.vision_model.embeddings.patch_embedding.weight
    assert conv.shape == (32, 14, 14, 3)  # transposed to MLX's layout on load
    out = convert(str(google_vision_folder), tmp_path / "mlx", bits=8, group_size=32)
    keys = mx.load(str(out / "model.safetensors")).keys()
    assert "language_model.model.layers.0.mlp.down_proj.scales" in keys  # mlx-vlm layout
    assert not any(k.startswith("vision_tower") and k.endswith(".scales") for k in keys)
    converted = gemma_mlx.load(str(out))
    assert converted.config.has_vision and converted.quantization["bits"] == 8
    ids = image_prompt_ids()
    expected = google(ids, pixel_values=pixels)
    got = converted(ids, pixel_values=pixels)
    assert got.shape == (1, ids.shape[1], 262208)
    # 8-bit weights: close to the unquantized model, and the image changes the answer
    assert mx.abs(got - expected).max().item() < 0.05 * mx.abs(expected).max().item()
    other = converted(ids, pixel_values=mx.random.uniform(-1, 1, (1, 3, 28, 28)))
    assert mx.abs(other - got).max().item() > 1e-3


def test_quantized_vision_layers_load_as_the_files_say(google_vision_folder, tmp_path):
    """mlx-community files may quantize the tower too: quantize exactly what has scales."""
    google = gemma_mlx.load(str(google_vision_folder), quantize=False)
    nn.quantize(google.net, group_size=32, bits=4,
                class_predicate=lambda p, m: p.startswith("vision_tower") and
                isinstance(m, nn.Linear))
    folder = tmp_path / "qvision"
    folder.mkdir()
    weights = dict(tree_flatten(google.net.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(
        {**TINY_VISION, "quantization": {"group_size": 32, "bits": 4}}))
    copy_tokenizer(google_vision_folder, folder)
    loaded = gemma_mlx.load(str(folder))
    fc1 = loaded.net.vision_tower.vision_model.encoder.layers[0].mlp.fc1
    assert isinstance(fc1, nn.QuantizedLinear)
    assert not isinstance(loaded.net.decoder.layers[0].mlp.up_proj, nn.QuantizedLinear)
    pixels = mx.random.uniform(-1, 1, (1, 3, 28, 28))
    ids = image_prompt_ids()
    assert mx.allclose(loaded(ids, pixel_values=pixels), google(ids, pixel_values=pixels),
                       atol=1e-4)


def test_copies_of_one_tokenizer_are_read_once(folder_270m, tmp_path):
    """Every Gemma 3 size ships the same tokenizer files: a process reads them once, whichever
    folder they are in (a server loading a second model does not pay ~6 s again)."""
    from gemma_mlx.loading import load_tokenizer

    copy = tmp_path / "copy"
    copy.mkdir()
    copy_tokenizer(folder_270m, copy)
    assert load_tokenizer(copy) is load_tokenizer(folder_270m)
