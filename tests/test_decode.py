"""The compiled decode step (`decode.compiled_decode`) against the op-by-op model: same
logits and greedy tokens, across the sliding window and capacity growth, on mlx-lm's caches
that chat then keeps using (prefill, trim); the fused projections change no weight."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from conftest import TINY_TEXT
from mlx.utils import tree_flatten
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from test_text_model import ours_from, reference_model

from gemma_mlx.engine import SamplingSettings, Stats, generate_tokens
from gemma_mlx.loading import Model
from gemma_mlx.model import decode

CONFIG = {**TINY_TEXT, "vocab_size": 1000}  # sliding window 8, every other layer global
PROMPT = [2, 5, 7, 9, 11, 300, 400, 500, 600, 700, 800]


@pytest.fixture
def small_capacity_step(monkeypatch):
    monkeypatch.setattr(decode, "DECODE_CAPACITY_STEP", 16)  # grow (and retrace) often


def tiny_model() -> Model:
    return Model(ours_from(reference_model(CONFIG), CONFIG), None, Path("tiny"), None)


@pytest.mark.parametrize("kv_bits", [None, 8, 4])  # full-precision or quantized global caches
def test_logits_equal_the_plain_step_across_window_and_growth(small_capacity_step, kv_bits):
    net = tiny_model().net
    plain, fast_cache = net.make_cache(kv_bits), net.make_cache(kv_bits)
    ids = mx.array([PROMPT])
    net(ids, plain)
    net(ids, fast_cache)
    fast = decode.compiled_decode(net.decoder, fast_cache)
    assert fast is not None
    token = mx.array([3])
    # Quantized attention sums over the whole padded buffer (masked) where the plain step
    # sums over the tokens so far: another float32 summation order, so a looser bound.
    tolerance = 1e-4 if kv_bits is None else 1e-3
    for i in range(300):  # the global caches grow 256 -> 304 -> 320: a few traces
        expected = net(token[None], plain)[0, -1]
        got = fast.step(token, fast_cache)
        assert mx.abs(expected - got).max().item() < tolerance, i
        token = mx.array([(mx.argmax(expected).item() + 37 * i) % 1000])  # varied input
    assert [c.offset for c in fast_cache] == [c.offset for c in plain]
    more = mx.array([[4, 8, 15, 16, 23, 42]])  # the next chat turn, prefilled on both
    assert mx.abs(net(more, plain) - net(more, fast_cache)).max().item() < tolerance


def test_greedy_generation_equals_uncompiled(small_capacity_step):
    model = tiny_model()
    settings = SamplingSettings(temp=0.0, max_tokens=60)
    runs = [list(generate_tokens(model, PROMPT, model.make_cache(), settings, Stats(),
                                 compiled=c)) for c in (False, True)]
    assert runs[0] == runs[1] and len(runs[0]) == 60


def test_trimmed_cache_after_compiled_decode_continues_correctly():
    """Within the window nothing was overwritten: chat may trim (undo / retry) and go on."""
    config = {**CONFIG, "sliding_window": 64}
    net = ours_from(reference_model(config), config)
    cache = net.make_cache()
    net(mx.array([PROMPT]), cache)
    fast = decode.compiled_decode(net.decoder, cache)
    token = mx.array([3])
    for _ in range(10):
        token = mx.argmax(fast.step(token, cache), keepdims=True).astype(mx.int32)
    assert can_trim_prompt_cache(cache)
    trim_prompt_cache(cache, 12)  # back into the prompt
    assert cache[0].offset == len(PROMPT) + 10 - 12
    tail = mx.array([[21, 22, 23]])
    fresh = net.make_cache()
    expected = net(mx.concatenate([mx.array([PROMPT[:-2]]), tail], axis=1), fresh)[:, -3:]
    assert mx.abs(net(tail, cache) - expected).max().item() < 1e-4
    fast = decode.compiled_decode(net.decoder, cache)  # and decoding compiled again from there
    assert mx.abs(fast.step(mx.array([5]), cache)
                  - net(mx.array([[5]]), fresh)[0, -1]).max().item() < 1e-4


def test_fused_projections_keep_every_weight_and_share_memory():
    net = tiny_model().net
    before = {k: mx.array(v) for k, v in tree_flatten(net.parameters())}
    mx.eval(before)
    program = decode.decode_program(net.decoder)
    after = dict(tree_flatten(net.parameters()))
    assert after.keys() == before.keys()
    assert all(mx.array_equal(before[k], after[k]).item() for k in before)
    assert len(program.qkv[0]) == 1 and len(program.gate_up[0]) == 1  # all fused here
    fused, rows = program.qkv[0][0]
    attn = net.decoder.layers[0].self_attn
    assert rows == [attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0],
                    attn.v_proj.weight.shape[0]]
    assert fused.weight.shape[0] == sum(rows)
    assert decode.decode_program(net.decoder) is program  # made once
    net.load_weights(list(before.items()))  # replaced weights: made again from the new ones
    assert decode.decode_program(net.decoder) is not program


def test_other_caches_decode_the_plain_way():
    net = tiny_model().net
    assert decode.compiled_decode(net.decoder, net.make_cache()) is None  # empty: nothing prefilled
    cache = net.make_cache()
    net(mx.array([PROMPT]), cache)
    cache[0] = cache[0].__class__(max_size=4)  # a window the model does not have
    assert decode.compiled_decode(net.decoder, cache) is None


def test_real_270m_greedy_tokens_equal_uncompiled(model_270m):
    ids = model_270m.tokenizer.encode("The capital of France is")
    settings = SamplingSettings(temp=0.0, max_tokens=16)
    runs = [list(generate_tokens(model_270m, ids, model_270m.make_cache(), settings, Stats(),
                                 compiled=c)) for c in (False, True)]
    assert runs[0] == runs[1] and len(runs[0]) == 16



def test_the_decoder_knows_nothing_of_its_compiled_step():
    """The dependency runs one way: decode.py reads text.py's modules, never the reverse."""
    import ast
    import inspect

    from gemma_mlx.model import text

    tree = ast.parse(inspect.getsource(text))
    imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
    assert not any(name.split(".")[-1] == "decode" for name in imported), imported


def test_a_seed_draws_the_same_whatever_ran_before(small_capacity_step):
    """A seeded run is its seed's alone: the first in a fresh model (which compiles its step)
    and a later one, with random draws elsewhere in between, give the same tokens."""
    model = tiny_model()
    settings = SamplingSettings(temp=1.0, max_tokens=40, seed=3)
    first = list(generate_tokens(model, PROMPT, model.make_cache(), settings, Stats()))
    mx.random.uniform(shape=(5,))  # someone else's draw
    again = list(generate_tokens(model, PROMPT, model.make_cache(), settings, Stats()))
    assert first == again
