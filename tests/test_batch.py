"""Continuous batching (gemma_mlx/batch.py): every stream of a batch gets what it gets alone.

Tiny random float32 models with the 270M's tokenizer (test_chat's); their sliding window is 16
tokens, so the rings wrap within a reply. Greedy replies in a batch of mixed prompt lengths,
streams joining mid-way, rows growing and shrinking, a prefix-cache hit, and seeded sampling:
token for token what a solo run gives."""

from __future__ import annotations

import pytest
from test_chat import tiny_model

import gemma_mlx
from gemma_mlx import BadRequest
from gemma_mlx.batch import Batch, Stream, batch_generate
from gemma_mlx.chat import prompt_ids
from gemma_mlx.engine import SamplingSettings, cache_offset
from gemma_mlx.prompt import Prompt
from gemma_mlx.session import Session

PROMPTS = ["Hi", "Tell me about the rivers of Europe, one by one, please.", "x y z",
           "A much longer prompt about mountains. " * 6, "Why?"]


@pytest.fixture(scope="module")
def model(model_270m):
    return tiny_model(model_270m.tokenizer, "tiny")  # window 16: the rings wrap


def solo(model, prompt: str, **sampling) -> list[int]:
    return list(gemma_mlx.stream(model, prompt, raw=True, **sampling))[-1].tokens


def run(batch: Batch, streams: list[Stream], join_at: dict[int, int] | None = None) -> dict:
    """Steps the batch until every stream ends; streams listed in `join_at` (index: step)
    join at that step, the others at once. Returns each stream's tokens and finish."""
    join_at = join_at or {}
    waiting = {i: s for i, s in enumerate(streams)}
    results: dict[int, tuple] = {}
    index = {id(s): i for i, s in enumerate(streams)}
    step = 0
    while waiting or not batch.idle:
        for i in [i for i in waiting if join_at.get(i, 0) <= step]:
            batch.add(waiting.pop(i))
        for stream, chunk in batch.step():
            if chunk.finish_reason is not None:
                results[index[id(stream)]] = (list(chunk.tokens), chunk.finish_reason)
        step += 1
        assert step < 2000
    return results


def streams_for(model, prompts, **sampling) -> list[Stream]:
    return [Stream(Prompt(prompt_ids(model, p, raw=True)), SamplingSettings(**sampling),
                   Session(model)) for p in prompts]


def test_greedy_in_a_batch_equals_solo_with_mixed_lengths_and_late_joiners(model):
    expected = [solo(model, p, temp=0, max_tokens=n) for p, n in zip(PROMPTS, (30, 9, 40, 25, 3),
                                                                     strict=True)]
    streams = [Stream(Prompt(prompt_ids(model, p, raw=True)), SamplingSettings(temp=0,
                                                                               max_tokens=n),
                      Session(model)) for p, n in zip(PROMPTS, (30, 9, 40, 25, 3), strict=True)]
    batch = Batch(model, max_batch=8, prefill_chunk=16)
    results = run(batch, streams, join_at={2: 5, 3: 12, 4: 30})
    assert [results[i][0] for i in range(len(PROMPTS))] == expected
    assert all(results[i][1] in ("stop", "length") for i in results)
    assert batch.idle and batch.kv.rows == 0  # every row freed, the buffers gone


def test_the_timeline_moves_and_compacts_as_streams_come_and_go(model, monkeypatch):
    """A small capacity step: the global layers fill up, the slots before the earliest start
    are dropped and they grow; longer newcomers move the others along the timeline."""
    from gemma_mlx import batch as batch_module

    monkeypatch.setattr(batch_module, "DECODE_CAPACITY_STEP", 16)
    monkeypatch.setattr(batch_module, "BATCH_MIN_CAPACITY", 16)
    plan = [(PROMPTS[0], 40, 0), (PROMPTS[3], 10, 3), (PROMPTS[2], 30, 20), (PROMPTS[1], 20, 45)]
    expected = [solo(model, p, temp=0, max_tokens=n) for p, n, _ in plan]
    streams = [Stream(Prompt(prompt_ids(model, p, raw=True)), SamplingSettings(temp=0,
                                                                               max_tokens=n),
                      Session(model)) for p, n, _ in plan]
    batch = Batch(model, max_batch=4)
    shifts = []
    real = batch.kv._shift

    def recording(delta):
        shifts.append(delta)
        real(delta)

    batch.kv._shift = recording
    results = run(batch, streams, join_at={i: at for i, (_, _, at) in enumerate(plan)})
    assert [results[i][0] for i in range(4)] == expected
    assert any(d > 0 for d in shifts) and any(d < 0 for d in shifts)


def test_rows_grow_and_shrink_and_each_session_keeps_its_cache(model):
    lengths = (5, 10, 15, 30)
    expected = [solo(model, p, temp=0, max_tokens=n) for p, n in zip(PROMPTS, lengths,
                                                                     strict=False)]
    streams = [Stream(Prompt(prompt_ids(model, p, raw=True)), SamplingSettings(temp=0,
                                                                               max_tokens=n),
                      Session(model)) for p, n in zip(PROMPTS, lengths, strict=False)]
    batch = Batch(model, max_batch=4)
    sizes = []
    original = batch.step

    def recording():
        out = original()
        sizes.append(batch.kv.rows)
        return out

    batch.step = recording
    results = run(batch, streams)
    assert [results[i][0] for i in range(4)] == expected
    grown = sizes.index(4)
    assert 1 in sizes[grown:] and sizes[-1] == 0  # down to one row for the last, then none
    for stream in streams:  # the cache holds the prompt and what it read, as after solo
        session = stream.session
        assert cache_offset(session.cache) == len(session.ids)
        assert session.ids[:len(stream.prompt.ids)] == stream.prompt.ids


def test_a_stream_whose_prefix_is_cached_joins_from_its_cached_state(model):
    session = Session(model)
    first = Prompt(prompt_ids(model, PROMPTS[1], raw=True))
    list(session.stream(first, SamplingSettings(temp=0, max_tokens=6)))
    follow = Prompt(session.ids + prompt_ids(model, " And then?", raw=True)[1:])
    fresh = Session(model)
    expected = [c.tokens for c in fresh.stream(follow, SamplingSettings(temp=0, max_tokens=12))][-1]
    stream = Stream(follow, SamplingSettings(temp=0, max_tokens=12), session)
    other = streams_for(model, [PROMPTS[0]], temp=0, max_tokens=12)[0]
    results = run(Batch(model, max_batch=2), [stream, other])
    assert session.cached_tokens == len(first.ids) + 5 and session.prefilled_tokens < 10
    assert results[0][0] == expected


def test_sampling_settings_stay_per_stream(model):
    settings = [dict(temp=1.0, seed=3, max_tokens=15), dict(temp=0.7, top_k=5, seed=9,
                                                            max_tokens=15),
                dict(temp=0, max_tokens=15, repetition_penalty=1.3), dict(temp=0, max_tokens=4)]
    expected = [solo(model, PROMPTS[i], **s) for i, s in enumerate(settings)]
    streams = [Stream(Prompt(prompt_ids(model, PROMPTS[i], raw=True)), SamplingSettings(**s),
                      Session(model)) for i, s in enumerate(settings)]
    results = run(Batch(model, max_batch=4), streams)
    assert [results[i][0] for i in range(4)] == expected
    assert results[3][1] == "length" and len(results[3][0]) == 4


def test_a_cancelled_stream_leaves_and_the_others_go_on(model):
    expected = solo(model, PROMPTS[0], temp=0, max_tokens=25)
    asked = []

    def stop_after_five() -> bool:
        asked.append(1)
        return len(asked) >= 5

    streams = streams_for(model, PROMPTS[:2], temp=0, max_tokens=25)
    streams[1].should_stop = stop_after_five
    results = run(Batch(model, max_batch=2), streams)
    assert results[0][0] == expected
    assert results[1][1] == "cancelled" and len(results[1][0]) < 6


def test_logprobs_in_a_batch_equal_solo(model):
    solo_chunks = [c for c in gemma_mlx.engine.stream_tokens(
        model, prompt_ids(model, PROMPTS[1], raw=True), SamplingSettings(temp=0, max_tokens=6),
        logprobs=2) if c.finish_reason is None]
    streams = streams_for(model, PROMPTS[:2], temp=0, max_tokens=6)
    streams[1] = Stream(streams[1].prompt, streams[1].settings, streams[1].session, logprobs=2)
    batch = Batch(model, max_batch=2)
    got = []
    for s in streams:
        batch.add(s)
    while not batch.idle:
        got += [c for s, c in batch.step() if s is streams[1] and c.finish_reason is None]
    assert [c.token for c in got] == [c.token for c in solo_chunks]
    for a, b in zip(got, solo_chunks, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]


def test_quantized_kv_rows_equal_solo(model):
    prompts = PROMPTS[:3]
    expected = []
    for p in prompts:
        session = Session(model, kv_bits=8)
        chunks = list(session.stream(Prompt(prompt_ids(model, p, raw=True)),
                                     SamplingSettings(temp=0, max_tokens=12)))
        expected.append(chunks[-1].tokens)
    streams = [Stream(Prompt(prompt_ids(model, p, raw=True)), SamplingSettings(temp=0,
                                                                               max_tokens=12),
                      Session(model, kv_bits=8)) for p in prompts]
    results = run(Batch(model, max_batch=4), streams)
    assert [results[i][0] for i in range(3)] == expected


def test_batch_generate_takes_per_prompt_settings(model):
    expected = [gemma_mlx.generate(model, p, raw=True, temp=0, max_tokens=n)
                for p, n in zip(PROMPTS[:3], (5, 12, 8), strict=True)]
    got = batch_generate(model, PROMPTS[:3], raw=True, temp=0,
                         settings=[{"max_tokens": 5}, {"max_tokens": 12}, {"max_tokens": 8}])
    assert got == expected
    assert gemma_mlx.batch_generate is batch_generate
    with pytest.raises(BadRequest, match="one per prompt"):
        batch_generate(model, PROMPTS[:2], settings=[{}])
    with pytest.raises(BadRequest, match="temperature"):
        batch_generate(model, PROMPTS[:2], temp=-1)


def test_a_bad_stream_is_refused_and_the_batch_carries_on(model):
    batch = Batch(model, max_batch=2)
    good = streams_for(model, [PROMPTS[0]], temp=0, max_tokens=5)[0]
    batch.add(good)
    too_long = Stream(Prompt([2] * 600), SamplingSettings(temp=0), Session(model))
    with pytest.raises(gemma_mlx.ContextOverflow):
        batch.add(too_long)
    assert not too_long.session.busy
    last = None
    while not batch.idle:
        last = [c for s, c in batch.step() if c.finish_reason is not None] or last
    assert last[0].tokens == solo(model, PROMPTS[0], temp=0, max_tokens=5)


def test_the_global_layers_grow_by_doubling_then_by_whole_steps():
    from gemma_mlx.batch import batch_capacity
    from gemma_mlx.model.decode import DECODE_CAPACITY_STEP

    assert [batch_capacity(n) for n in (1, 128, 129, 300)] == [128, 128, 256, 512]
    assert batch_capacity(DECODE_CAPACITY_STEP + 1) == 2 * DECODE_CAPACITY_STEP


def test_an_id_past_the_tokenizer_reads_as_no_text(model):
    """A vision model's embedding is 64 rows longer than its tokenizer: sampling one of those
    ids (random weights do) must not fail the generation."""
    from gemma_mlx.engine import add_token

    detok = model.tokenizer.detokenizer
    detok.reset()
    add_token(detok, model.tokenizer.encode("Hi", add_special_tokens=False)[0])
    add_token(detok, len(detok.tokenmap) + 5)
    detok.finalize()
    assert detok.text == "Hi"
