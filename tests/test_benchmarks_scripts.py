"""The conversation and context benchmark scripts (benchmarks/) run end to end on the tiny random
shape in seconds and report every figure (no timings asserted: they depend on the machine)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def test_word_tokenizer_keeps_gemma_special_ids_and_round_trips(scripts):
    WordTokenizer = scripts("growing_chat").WordTokenizer
    text = "<start_of_turn>user\nhello there world<end_of_turn>\n"
    tok = WordTokenizer(262_144)
    ids = tok.encode(text)
    assert ids[0] == 105 and ids[-2] == 106 and len(ids) == 7
    assert all(1000 <= i < 262_144 for i in ids if i not in (105, 106))
    assert tok.decode(ids) == text
    assert ids == WordTokenizer(262_144).encode(text)  # stable across instances
    assert all(i in (105, 106) or 256 <= i < 1024 for i in WordTokenizer(1024).encode(text))


def test_conversation_memory_grows_a_chat_reusing_its_cache(scripts, tmp_path):
    out = tmp_path / "memory.json"
    report = scripts("conversation_memory").main(
        ["--shape", "tiny", "--context", "400", "--user-tokens", "60", "--reply-tokens", "8",
         "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    turns = report["turns"]
    assert len(turns) >= 4 and turns[-1]["last"]
    contexts = [t["context_tokens"] for t in turns]
    assert contexts == sorted(contexts) and 300 < contexts[-1] <= 400
    for t in turns[1:]:  # follow-ups prefill only their own tokens
        assert t["prefilled_tokens"] < 80 < t["prompt_tokens"]
    for t in turns:
        for key in ("peak_memory_bytes", "weights_bytes", "kv_cache_bytes", "kv_used_bytes",
                    "active_memory_bytes", "ttft_s"):
            assert t[key] > 0, key
        assert t["kv_used_bytes"] <= t["kv_cache_bytes"]
        assert t["peak_ratio"] == pytest.approx(
            t["peak_memory_bytes"] / (t["weights_bytes"] + t["kv_cache_bytes"]))
    assert report["summary"]["context_tokens"] == contexts[-1]


def test_followup_ttft_times_reuse_and_fresh_prefill(scripts, tmp_path):
    report = scripts("followup_ttft").main(
        ["--shape", "tiny", "--context", "300", "--user-tokens", "50", "--reply-tokens", "8",
         "--repeats", "2", "--fresh-every", "2", "--json", str(tmp_path / "ttft.json")])
    points = report["points"]
    assert len(points) >= 3 and report["peer"] == "mlx-lm"
    for i, p in enumerate(points):
        assert len(p["reuse"]["runs"]["ttft_s"]) == 2 and p["reuse"]["ttft_s"] > 0
        timed = i % 2 == 0 or i == len(points) - 1
        for name in ("fresh_ours", "fresh_mlx_lm"):
            assert (p[name] is not None) == timed
            if timed:
                assert p[name]["ttft_s"] > 0 and len(p[name]["runs"]) == 2
    assert report["summary"]["last"]["prompt_tokens"] == points[-1]["prompt_tokens"]


def test_decode_vs_context_reports_both_implementations(scripts, tmp_path):
    report = scripts("decode_vs_context").main(
        ["--shape", "tiny", "--contexts", "16,64", "--gen-tokens", "4", "--repeats", "1",
         "--json", str(tmp_path / "context.json")])
    assert [e["prompt_tokens"] for e in report["results"]] == [16, 64]
    for e in report["results"]:
        assert e["ours"]["decode_tps"] > 0 and e["peer"]["decode_tps"] > 0


def test_plot_draws_each_kind(scripts, tmp_path):
    sources = []
    for name, argv in (("conversation_memory", ["--context", "200", "--user-tokens", "40"]),
                       ("followup_ttft", ["--context", "200", "--user-tokens", "40",
                                          "--repeats", "1"]),
                       ("decode_vs_context", ["--contexts", "16,32", "--gen-tokens", "3",
                                              "--repeats", "1"])):
        path = tmp_path / f"{name}.json"
        extra = [] if name == "decode_vs_context" else ["--reply-tokens", "4"]
        scripts(name).main(["--shape", "tiny", *argv, *extra, "--json", str(path)])
        sources.append(str(path))
    scripts("plot").main(sources)
    for source in sources:
        assert Path(source).with_suffix(".png").stat().st_size > 1000


def test_qat_grids_measures_each_grid_against_the_reference(scripts):
    """On a tiny random decoder: the reference agrees with itself, every grid costs something,
    the Q4_0 grid is gguf-py's and the embedding is quantized only in the "+ embedding" rows."""
    import mlx.core as mx
    import numpy as np
    from conftest import TINY_TEXT
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    from mlx.utils import tree_flatten

    from gemma_mlx.config import ModelConfig
    from gemma_mlx.model.gemma3 import Gemma3

    grids = scripts("qat_grids")
    net = Gemma3(ModelConfig.from_dict(TINY_TEXT))
    mx.eval(net.parameters())
    matrices = {k: v for k, v in tree_flatten(net.parameters()) if v.ndim == 2}
    types = {k: "embedding F32" if k == grids.EMBEDDING else "F32" for k in matrices}
    w = np.array(matrices[next(k for k in matrices if ".layers." in k)])
    q4_0 = GGMLQuantizationType.Q4_0
    np.testing.assert_array_equal(np.array(grids.q4_0(mx.array(w))),
                                  dequantize(quantize(w, q4_0), q4_0).reshape(w.shape))
    windows = [mx.array([2, 818, 5279, 529, 7001, 563]), mx.array([2, 9079, 236761, 108])]
    rows = grids.measure(net, matrices, types, windows)
    assert [(r["grid"], r["embedding"]) for r in rows] == [("float32 reference", "float32")] + [
        (g, e) for g in grids.GRIDS for e in ("float32", "quantized")]
    assert rows[0]["kl_mean"] == 0 and rows[0]["top1_agreement"] == 1
    for row in rows[1:]:
        assert row["kl_mean"] > 0 and 0 <= row["top1_agreement"] <= 1 and row["perplexity"] > 0
        assert ("embedding F32" in row["weight_rel_rms"]) == (row["embedding"] == "quantized")
    for key, value in tree_flatten(net.parameters()):  # the reference is back in place
        if key in matrices:
            assert value is matrices[key]


def test_constraint_value_counts_valid_replies_both_ways(scripts, tmp_path, folder_270m):
    """On a tiny random model with the 270M's tokenizer (a base model, as the 270M): the
    figures of the real one are in RESULTS.md."""
    from checkpoints import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(tmp_path / "tiny", folder_270m, vision=False,
                                 chat_template=False)
    out = tmp_path / "value.json"
    report = scripts("constraint_value").main(["--model", str(tiny), "--limit", "2",
                                               "--max-tokens", "40", "--json", str(out)])
    assert json.loads(out.read_text())["schemas"] == 2 == len(report["rows"])
    assert report["valid_with"] == 2  # the constraint's promise, even on random weights
    for row in report["rows"]:
        assert row["with"]["valid"] and row["with"]["tokens"] <= 40
        assert isinstance(row["without"]["valid"], bool)


def test_grammar_engines_reports_llguidance(scripts, tmp_path, folder_270m):
    report = scripts("grammar_engines").main(["--engines", "llguidance", "--tokens", "8",
                                              "--repeats", "1"])
    engine = report["engines"][0]
    assert engine["engine"] == "llguidance" and len(engine["cases"]) == 4
    for case in engine["cases"]:
        assert case["tokens"] == 8 and case["mask_ms"]["median"] > 0


def test_constraint_levers_variants_decode_what_the_engine_decodes(scripts, folder_270m):
    """The variants are timed against each other, so each constrained one must produce the
    engine's very tokens (greedy), and the script must report every variant."""
    from gemma_mlx import engine
    from gemma_mlx.bench import borrowed_tokenizer, prompt_ids, random_model, schema_file

    levers = scripts("constraint_levers")
    model = random_model("tiny-vocab")
    model.tokenizer = borrowed_tokenizer(model)
    grammar = schema_file(str(BENCHMARKS / "schemas/records.json"))
    prompt = prompt_ids(16, model.config.text.vocab_size)
    original = engine._constrained
    replies = {}
    try:
        for name in ("engine", "uploaded-each-step", "engine-profiled", "merged",
                     "reader-thread"):
            variant = levers.Variant(model, grammar, name, levers.VARIANTS[name])
            replies[name] = list(variant.tokens(prompt, 40))
    finally:
        engine._constrained = original
    assert len(replies["engine"]) == 40
    assert all(tokens == replies["engine"] for tokens in replies.values())
    report = levers.main(["--shape", "tiny-vocab", "--prompt-tokens", "8", "--gen-tokens", "4",
                          "--repeats", "1"])
    assert set(report["variants"]) == {"plain", *levers.VARIANTS}
    assert engine._constrained is original
