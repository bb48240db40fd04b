"""The bench command on a tiny random model: every figure is there and positive (no timings are
asserted: they depend on the machine)."""

from __future__ import annotations

import json

import pytest

from gemma_mlx import cli
from gemma_mlx.bench import random_model, shape_config

FIGURES = ("prefill_tps", "decode_tps", "ttft_s", "peak_memory_bytes")
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
            for name in FIGURES:
                assert figures[name] > 0, (side, name)
                assert all(run[name] > 0 for run in figures["runs"])
        assert set(entry["ratio"]) == set(FIGURES)
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
    for word in ("prefill tok/s", "decode tok/s", "ttft s", "peak GB", "gemma-mlx", "mlx-lm",
                 "ours/peer"):
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


def test_random_shapes_are_the_reference_sizes():
    four = shape_config("4b").text
    assert (four.hidden_size, four.num_hidden_layers, four.num_key_value_heads,
            four.sliding_window, four.vocab_size, four.rope_global_scale) == (
        2560, 34, 4, 1024, 262208, 8.0)
    assert four.layer_types.count("full_attention") == 5  # layers 6, 12, ..., 30
    model = random_model("tiny")
    assert model.quantization == {"group_size": 64, "bits": 4}
    assert model.net.decoder.layers[0].mlp.up_proj.bits == 4
