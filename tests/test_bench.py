"""The bench command on a tiny random model: every figure is there and positive (no timings are
asserted: they depend on the machine)."""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.base import create_causal_mask
from mlx_vlm.generate import generate_step  # a dev dependency

from gemma_mlx import cli
from gemma_mlx.bench import (
    ImagePrompt,
    MlxVlm,
    Ours,
    mlx_vlm_peer,
    prompt_ids,
    random_model,
    shape_config,
)
from gemma_mlx.engine import prefill
from gemma_mlx.model import gemma3

FIGURES = ("prefill_tps", "decode_tps", "ttft_s", "peak_memory_bytes")
WITH_KV = (*FIGURES, "kv_cache_bytes")  # where the implementation's cache can be measured
TINY = ["bench", "--random", "tiny", "--prompt-tokens", "16,40", "--gen-tokens", "4",
        "--repeats", "2"]


def run_json(capsys, *extra: str) -> dict:
    assert cli.main([*TINY, *extra, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def test_json_has_every_field_positive_with_mlx_lm_comparison(capsys):
    report = run_json(capsys, "--compare", "mlx-lm")
    assert report["peer"] == "mlx-lm" and report["compiled"] is True
    assert report["gen_tokens"] == 4 and report["repeats"] == 2
    for key in ("model", "device", "dtype", "mlx", "mlx_lm"):
        assert isinstance(report[key], str) and report[key]
    assert [r["prompt_tokens"] for r in report["results"]] == [16, 40]
    for entry in report["results"]:
        for side in ("ours", "peer"):
            figures = entry[side]
            assert figures["generated_tokens"] == 4
            assert len(figures["runs"]) == 2
            for name in WITH_KV:
                assert figures[name] > 0, (side, name)
                assert all(run[name] > 0 for run in figures["runs"])
        assert set(entry["ratio"]) == set(WITH_KV)
        assert all(v > 0 for v in entry["ratio"].values())


def test_without_compare_only_ours_and_uncompiled_option(capsys):
    report = run_json(capsys, "--no-compile")
    assert report["peer"] is None and report["compiled"] is False
    for entry in report["results"]:
        assert entry["peer"] is None and entry["ratio"] is None
        assert all(entry["ours"][name] > 0 for name in FIGURES)


def test_table_output(capsys):
    assert cli.main([*TINY, "--compare", "mlx-lm"]) == 0
    captured = capsys.readouterr()
    for word in ("prefill tok/s", "decode tok/s", "ttft s", "peak memory", "KV cache",
                 "gemma-mlx", "mlx-lm", "ours/peer"):
        assert word in captured.out
    assert "decode" in captured.err  # progress lines go to stderr


@pytest.mark.parametrize("args,fragment", [
    (["--prompt-tokens", "12,abc"], "--prompt-tokens"),
    (["--prompt-tokens", "1"], "at least 2"),
    (["--gen-tokens", "1"], "--gen-tokens"),
    (["--repeats", "0"], "--repeats"),
    (["--prompt-tokens", "5000"], "context window"),
])
def test_bad_options_are_one_line_errors(capsys, args, fragment):
    assert cli.main(["bench", "--random", "tiny", *args]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0]


@pytest.mark.parametrize("bound, most", [(["--kv-bits", "8"], 0.5), (["--kv-bits", "4"], 0.3),
                                         (["--max-context", "128"], 0.5)])
def test_kv_bounds_are_measured_beside_the_full_cache(capsys, bound, most):
    """Without --compare, the peer is our own engine with the whole full-precision cache: the
    ratios say what the bound saves (the tiny model's 16-token window keeps the sliding
    layers small, so the global layers' cache dominates at 600 tokens)."""
    assert cli.main(["bench", "--random", "tiny", "--prompt-tokens", "600", "--gen-tokens", "4",
                     "--repeats", "1", *bound, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["peer"] == "gemma-mlx full KV"
    assert (report["kv_bits"], report["max_context"]) == (
        int(bound[1]) if bound[0] == "--kv-bits" else None,
        int(bound[1]) if bound[0] == "--max-context" else None)
    (entry,) = report["results"]
    assert 0 < entry["ours"]["kv_cache_bytes"] < most * entry["peer"]["kv_cache_bytes"]
    assert entry["ratio"]["kv_cache_bytes"] < most


@pytest.mark.parametrize("args, fragment", [
    (["--max-context", "10"], "at least 64"),
    (["--max-context", "128", "--image"], "no --image"),
])
def test_bad_bound_options_are_one_line_errors(capsys, args, fragment):
    assert cli.main(["bench", "--random", "tiny", *args]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0]


def test_random_shapes_are_the_reference_sizes():
    four = shape_config("4b").text
    assert (four.hidden_size, four.num_hidden_layers, four.num_key_value_heads,
            four.sliding_window, four.vocab_size, four.rope_global_scale) == (
        2560, 34, 4, 1024, 262208, 8.0)
    assert four.layer_types.count("full_attention") == 5  # layers 6, 12, ..., 30
    model = random_model("tiny")
    assert model.quantization == {"group_size": 64, "bits": 4}
    assert model.net.decoder.layers[0].mlp.up_proj.bits == 4


# ---- --image and --compare mlx-vlm -----------------------------------------------------------

@pytest.mark.parametrize("image", [True, False])
def test_mlx_vlm_comparison_with_and_without_image(capsys, image):
    report = run_json(capsys, "--compare", "mlx-vlm", *(["--image"] if image else []))
    assert report["peer"] == "mlx-vlm" and report["image"] is image
    assert report["mlx_vlm"] == "0.7.10"
    assert report["model"] == "random tiny with vision tower (4-bit g64)"
    for entry in report["results"]:
        for side in ("ours", "peer"):
            assert entry[side]["generated_tokens"] == 4 and len(entry[side]["runs"]) == 2
            assert all(entry[side][name] > 0 for name in FIGURES), side
        assert set(entry["ratio"]) == set(FIGURES)
        assert all(v > 0 for v in entry["ratio"].values())


def test_image_table_output(capsys):
    assert cli.main([*TINY, "--image", "--compare", "mlx-vlm"]) == 0
    out = capsys.readouterr().out
    assert "one image per prompt" in out and "mlx-vlm" in out and "ours/peer" in out


def tiny_image_pair():
    mx.random.seed(0)
    model = random_model("tiny", vision=True)
    return model, mlx_vlm_peer(model), ImagePrompt.of(model.config)


def test_same_first_token_on_the_image_prompt():
    """The bench's own drivers of both sides, on one image prompt: the same first token (the
    log-probs differ slightly: see the next test)."""
    model, peer, image = tiny_image_pair()
    prompt = prompt_ids(24, model.config.text.vocab_size, image=image)
    assert prompt[1:8] == [997, 999, 999, 999, 999, 998, prompt[7]]
    ours = list(Ours(model).tokens(prompt, 3, image.pixel_values))
    theirs = list(MlxVlm(peer).tokens(prompt, 3, image.pixel_values))
    assert ours[0] == theirs[0]


def test_mlx_vlm_peer_differs_only_where_mlx_vlm_does(monkeypatch):
    """The peer holds our weights, tower included. On a text prompt the first token's log-probs
    agree to float32 rounding (measured 1.4e-6). On the image prompt they cannot: mlx-vlm 0.7.10
    scales the soft tokens by sqrt(64) / sqrt(2048) (its default top-level hidden_size; the
    reference does not scale them), uses eps 1e-5 in the tower's last LayerNorm, and prefills
    the image's tokens causally where the reference (and we) let them see each other: 5e-4
    apart as mlx-vlm loads it, 3e-4 with the first two undone (the first token is the same: the
    top two log-probs are 0.1 apart). Make ours causal too, and they agree again (1.9e-6)."""
    model, peer, image = tiny_image_pair()
    vocab = model.config.text.vocab_size

    def ours(prompt, pixels):
        features = model.net.encode_images(pixels) if pixels is not None else None
        logits = prefill(model, prompt, model.make_cache(), image_features=features)
        return np.array(logits - mx.logsumexp(logits))

    def theirs(prompt, pixels):
        ids = mx.array(prompt)[None]
        step = generate_step(ids, peer, pixels, mx.ones(ids.shape, mx.int32), max_tokens=1,
                             temperature=0.0)
        return np.array(next(step)[1])

    text = prompt_ids(24, vocab)
    np.testing.assert_allclose(ours(text, None), theirs(text, None), atol=1e-5, rtol=0)
    prompt, pixels = prompt_ids(24, vocab, image=image), image.pixel_values
    peer.config.hidden_size = model.config.text.hidden_size
    peer.vision_tower.vision_model.post_layernorm.eps = model.config.vision.layer_norm_eps
    assert np.abs(ours(prompt, pixels) - theirs(prompt, pixels)).max() > 1e-4  # attention

    def causal(is_image, cache, cfg):
        n = is_image.shape[0]
        return create_causal_mask(n, 0), create_causal_mask(n, 0, window_size=cfg.sliding_window)

    monkeypatch.setattr(gemma3, "image_block_masks", causal)
    np.testing.assert_allclose(ours(prompt, pixels), theirs(prompt, pixels), atol=1e-5, rtol=0)


@pytest.mark.parametrize("args,fragment", [
    (["--random", "1b", "--image"], "1b takes text only"),
    (["--random", "270m", "--image", "--compare", "mlx-vlm"], "270m takes text only"),
    (["--random", "tiny", "--image", "--prompt-tokens", "16,7"], "at least 8"),
    (["--random", "tiny", "--image", "--compare", "mlx-lm"], "--compare mlx-vlm"),
])
def test_bad_image_options_are_one_line_errors(capsys, args, fragment):
    assert cli.main(["bench", *args]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0]


def test_missing_mlx_vlm_says_install_the_dev_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_vlm", None)  # import mlx_vlm raises ImportError
    assert cli.main(["bench", "--random", "tiny", "--compare", "mlx-vlm"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "install the dev extra" in err[0]


def test_random_vision_shapes_are_the_reference_sizes():
    vision = shape_config("4b", vision=True)
    assert vision.text.hidden_size == 2560 and vision.mm_tokens_per_image == 256
    v = vision.vision
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads,
            v.patch_size, v.image_size) == (1152, 4304, 27, 16, 14, 896)
    assert (vision.boi_token_index, vision.eoi_token_index, vision.image_token_index) == (
        255_999, 256_000, 262_144)
    model = random_model("tiny", vision=True)
    assert model.net.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype == (
        mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16)
    assert not hasattr(model.net.multi_modal_projector, "bits")  # the tower stays float


SCHEMA = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}},
          "required": ["a"], "additionalProperties": False}


def test_json_schema_is_measured_beside_plain_decoding(capsys, monkeypatch, tmp_path,
                                                      model_270m):
    """On a tiny model with the real tokenizer (a random shape has none; the tiny shape's
    vocabulary is too small for Gemma's)."""
    from test_chat import tiny_model

    monkeypatch.setattr("gemma_mlx.bench.random_model",
                        lambda shape, **kw: tiny_model(model_270m.tokenizer, "tiny"))
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    report = run_json(capsys, "--json-schema", str(path))
    assert report["peer"] == "json schema" and report["json_schema"] == str(path)
    for entry in report["results"]:
        con = entry["constraint"]
        assert con["decode_ratio"] > 0 and con["paired_ratio"] > 0 and con["mask_ms"] > 0
        assert con["replies"] >= 0 and entry["peer"]["generated_tokens"] == 4


@pytest.mark.parametrize("args, fragment", [
    (["--json-schema", "missing.json"], "cannot read the JSON schema file"),
    (["--json-schema", "SCHEMA", "--compare", "mlx-lm"], "leave out --compare"),
    (["--json-schema", "SCHEMA"], "Gemma's vocabulary"),
])
def test_bad_json_schema_options_are_one_line_errors(capsys, tmp_path, args, fragment):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    args = [str(path) if a == "SCHEMA" else a for a in args]
    assert cli.main([*TINY, *args]) == 1
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_concurrency_reports_every_figure_for_both_sides(capsys):
    assert cli.main(["bench", "--random", "tiny", "--concurrency", "1,3", "--prompt-tokens",
                     "12", "--gen-tokens", "5", "--repeats", "1", "--compare", "mlx-lm",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["peer"] == "mlx-lm BatchGenerator"
    assert [e["streams"] for e in report["concurrency"]] == [1, 3]
    for entry in report["concurrency"]:
        for side in ("ours", "peer"):
            figures = entry[side]
            assert set(figures) == {"aggregate_decode_tps", "throughput_tps",
                                    "per_stream_decode_tps", "ttft_p50_s", "ttft_p95_s",
                                    "peak_memory_bytes"}
            assert all(v > 0 for v in figures.values()), (side, figures)
            assert figures["ttft_p50_s"] <= figures["ttft_p95_s"]
        assert all(v > 0 for v in entry["ratio"].values())
