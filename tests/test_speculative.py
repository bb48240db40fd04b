"""Speculative decoding (`gemma_mlx.speculative`): the replies are the target's own.

Greedy, token for token what plain decoding gives, whatever the draft: the target itself (every
draft accepted), a near copy (some accepted) or an unrelated model (almost none), drafting 1 to
5 tokens at a time, on tiny models whose sliding window (8 or 16 tokens) the prompt passes many
times over, so rejected drafts are rolled back out of rotating caches that have wrapped; and on
the real 270M. Sampling: the acceptance rule keeps the target's distribution (checked on
synthetic distributions against the exact one). Chat: both KV caches are kept between turns,
trimmed or rebuilt together with undo and retry, and hold exactly the ids they are said to.

The tiny models draw their embedding small and the rest at unit scale, so that a reply depends
on the context (with every weight small a random Gemma only repeats one token, and every draft
would be accepted).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_TEXT
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import RotatingKVCache
from mlx_lm.sample_utils import make_sampler

import gemma_mlx
from gemma_mlx import BadRequest, Chat
from gemma_mlx.config import ModelConfig
from gemma_mlx.engine import SamplingSettings, Stats, cache_offset, generate_tokens, prefill
from gemma_mlx.loading import Model
from gemma_mlx.model.decode import compiled_decode
from gemma_mlx.model.gemma3 import Gemma3
from gemma_mlx.speculative import Checkpoint, Draft, Rule, rewind

CONFIG = {**TINY_TEXT, "vocab_size": 1000, "torch_dtype": "float32"}  # sliding window 8
GREEDY = SamplingSettings(temp=0.0, max_tokens=40)


def lively(config: dict, seed: int, tokenizer=None, name: str = "tiny",
           like: Model | None = None, noise: float = 0.0) -> Model:
    """A tiny random Gemma 3, or (with `like`) a copy of one with relative noise on every
    weight: a draft that agrees with it some of the time."""
    net = Gemma3(ModelConfig.from_dict(config))
    mx.random.seed(seed)
    if like is None:
        weights = [(k, mx.random.normal(v.shape) * (0.02 if "embed_tokens" in k else 1.0))
                   for k, v in tree_flatten(net.parameters())]
    else:
        weights = [(k, v * (1 + noise * mx.random.normal(v.shape)))
                   for k, v in tree_flatten(like.net.parameters())]
    net.update(tree_unflatten(weights))
    mx.eval(net.parameters())
    return Model(net, tokenizer, Path(name), quantization=None, name=name)


@pytest.fixture(scope="module")
def target():
    return lively(CONFIG, 0)


@pytest.fixture(scope="module")
def drafts(target):
    return {"itself": target, "near": lively(CONFIG, 1, like=target, noise=0.05),
            "stranger": lively(CONFIG, 2)}


def prompt_of(n: int, seed: int = 5, vocab: int = 1000) -> list[int]:
    return [2] + mx.random.randint(3, vocab, (n - 1,), key=mx.random.key(seed)).tolist()


def speculate(target: Model, draft: Model, prompt: list[int], settings: SamplingSettings,
              k: int, compiled: bool = True, stats: Stats | None = None) -> list[int]:
    run = Draft(draft, prompt=prompt, num_draft_tokens=k)
    return list(run.tokens(target, prompt, target.make_cache(), settings,
                           stats if stats is not None else Stats(), compiled=compiled))


def plain(model: Model, prompt: list[int], settings: SamplingSettings = GREEDY) -> list[int]:
    return list(generate_tokens(model, prompt, model.make_cache(), settings, Stats(),
                                compiled=False))


# ---- greedy: exactly plain decoding ------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("which", ["itself", "near", "stranger"])
def test_greedy_equals_plain_decoding(target, drafts, which, k):
    prompt = prompt_of(30)  # 30 + 40 tokens through a window of 8
    expected = plain(target, prompt)
    assert len(set(expected)) > 10  # a varied reply: drafts are really tested
    for compiled in (True, False):
        stats = Stats()
        assert speculate(target, drafts[which], prompt, GREEDY, k, compiled, stats) == expected
        assert stats.generated_tokens == GREEDY.max_tokens
        assert 0 <= stats.accepted_tokens <= stats.drafted_tokens
        rate = stats.acceptance_rate
        if which == "itself":
            assert rate == 1.0
        elif which == "near":
            assert 0.1 < rate < 1.0, rate
        else:
            assert rate < 0.2, rate


def test_greedy_with_a_repetition_penalty_equals_plain_decoding(target, drafts):
    settings = SamplingSettings(temp=0.0, max_tokens=30, repetition_penalty=1.5)
    prompt = prompt_of(20, seed=7)
    expected = plain(target, prompt, settings)
    assert expected != plain(target, prompt, SamplingSettings(temp=0.0, max_tokens=30))
    for which in ("itself", "near"):
        assert speculate(target, drafts[which], prompt, settings, 3) == expected


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4, 7])
def test_every_length_is_exact(target, drafts, max_tokens):
    settings = SamplingSettings(temp=0.0, max_tokens=max_tokens)
    prompt = prompt_of(12)
    assert speculate(target, drafts["near"], prompt, settings, 3) == plain(target, prompt,
                                                                          settings)


# ---- rolling back past the sliding window ------------------------------------------------------

def next_logits(model: Model, cache: list, ids: list[int]) -> mx.array:
    """Logits after reading ids one by one, then all at once (both update kinds)."""
    out = [model.net(mx.array([[t]]), cache)[0, -1] for t in ids]
    out.append(model.net(mx.array([ids]), cache)[0, -1])
    return mx.stack(out)


def test_rewind_after_a_multi_token_pass_equals_never_reading_the_rejected(target):
    """The target's rollback: a wrapped rotating cache (offset 40, window 8) reads 5 tokens in
    one pass (the last token and 4 drafts), up to 4 are dropped again; the cache then behaves
    as one that read only those kept."""
    prompt = prompt_of(40)
    for kept in range(1, 6):
        rolled, straight = target.make_cache(), target.make_cache()
        prefill(target, prompt, rolled)
        prefill(target, prompt, straight)
        verify = [11, 12, 13, 14, 15]
        target.net(mx.array([verify]), rolled)
        rewind(rolled, 5 - kept)
        target.net(mx.array([verify[:kept]]), straight)
        assert [c.offset for c in rolled] == [c.offset for c in straight]
        more = [21, 22, 23, 24, 25, 26, 27, 28, 29, 30]
        got, expected = next_logits(target, rolled, more), next_logits(target, straight, more)
        assert mx.abs(got - expected).max().item() < 1e-4, kept


@pytest.mark.parametrize("compiled", [True, False])
def test_checkpoints_undo_one_token_steps_past_the_window(target, compiled):
    """The draft's rollback: one-token steps overwrite the ring's oldest entries; restoring the
    checkpoint taken before a step undoes it and every later one."""
    prompt = prompt_of(40)
    steps = [31, 32, 33, 34]
    for back_to in range(len(steps)):
        cache = target.make_cache()
        prefill(target, prompt, cache)
        fast = compiled_decode(target.net.decoder, cache) if compiled else None
        checkpoints = []
        for t in steps:
            checkpoints.append(Checkpoint.of(cache))
            ids = mx.array([t])
            if fast is not None:
                fast.prepare(cache)
                fast.step(ids, cache)
            else:
                target.net(ids[None], cache)
        checkpoints[back_to].restore(cache)
        straight = target.make_cache()
        prefill(target, prompt + steps[:back_to], straight)
        assert cache_offset(cache) == cache_offset(straight) == len(prompt) + back_to
        assert any(isinstance(c, RotatingKVCache) and c.offset > c.max_size for c in cache)
        more = [41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
        got, expected = next_logits(target, cache, more), next_logits(target, straight, more)
        assert mx.abs(got - expected).max().item() < 1e-4, back_to


@pytest.mark.parametrize("read", [1, 2, 3, 4, 5, 6])
def test_a_reader_stopping_mid_round_leaves_caches_holding_what_it_read(target, drafts, read):
    """Closing the generator mid-round (a stop token among accepted drafts, Esc, max tokens)
    rolls both caches back to the tokens read; generation then continues from them exactly."""
    prompt = prompt_of(30)
    cache = target.make_cache()
    run = Draft(drafts["itself"], prompt=prompt, num_draft_tokens=4)
    tokens = run.tokens(target, prompt, cache, GREEDY, Stats())
    got = [next(tokens) for _ in range(read)]
    tokens.close()
    assert got == plain(target, prompt)[:read]
    # The target's: the prompt and the tokens read, the last one maybe not; the draft's a
    # part of those (it has not read the last of an accepted run yet).
    assert len(prompt) + read - 1 <= cache_offset(cache) <= len(prompt) + read
    assert len(prompt) <= cache_offset(run.cache) <= len(prompt) + read
    context = prompt + got + [77]  # the next turn brings new tokens
    more = Draft(run.model, run.cache, context[cache_offset(run.cache):], num_draft_tokens=4)
    continued = more.tokens(target, context[cache_offset(cache):], cache, GREEDY, Stats())
    assert list(continued) == plain(target, context)


# ---- sampling ----------------------------------------------------------------------------------

def test_the_acceptance_rule_keeps_the_target_distribution():
    """Drafts drawn from q, checked against p: the first emitted token is distributed as p
    (and would be as q under a rule that kept every draft)."""
    rule = Rule(SamplingSettings(temp=1.0, top_p=1.0, top_k=0))
    p = mx.array([[0.5, 0.3, 0.1, 0.05, 0.05, 0.0], [0.1, 0.1, 0.2, 0.2, 0.2, 0.2],
                  [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]])
    q = mx.array([[0.05, 0.1, 0.2, 0.25, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]])
    logits = mx.log(p)
    mx.random.seed(3)
    trials = 3000
    drafted = mx.random.categorical(mx.log(q), shape=(trials, 2))
    first = np.zeros(6)
    accepted = 0
    for i in range(trials):
        n, emitted = rule.accept(logits, drafted[i], q, [])
        first[emitted[0]] += 1
        accepted += n > 0
    expected = np.array(p[0])
    sigma = np.sqrt(expected * (1 - expected) / trials)
    assert np.all(np.abs(first / trials - expected) <= 4.5 * sigma + 1e-9), first / trials
    # P(accept the first draft) = sum(min(p, q)) = 0.05 + 0.1 + 0.1 + 0.05 + 0.05 + 0
    assert abs(accepted / trials - 0.35) < 0.04


def test_the_rule_filters_as_mlx_lms_sampler():
    """Top-p, min-p and top-k cut the same tokens, and temperature scales the same way."""
    settings = SamplingSettings(temp=0.7, top_p=0.9, min_p=0.02, top_k=6)
    rule = Rule(settings)
    logits = mx.random.normal((50,), key=mx.random.key(1)) * 2
    logprobs = logits - mx.logsumexp(logits)
    dist = np.array(rule.distribution(logprobs[None])[0])
    sampler = make_sampler(0.7, 0.9, 0.02, top_k=6)
    mx.random.seed(0)
    draws = np.array(sampler(mx.broadcast_to(logprobs, (4000, 50))))
    seen = np.bincount(draws, minlength=50) / 4000
    assert set(np.nonzero(seen)[0]) <= set(np.nonzero(dist)[0])
    assert np.abs(seen - dist).max() < 0.04
    assert abs(dist.sum() - 1) < 1e-5 and (dist > 0).sum() <= 6


def test_sampling_is_reproducible_and_accepts_its_own_drafts(target, drafts):
    settings = SamplingSettings(temp=1.0, top_k=20, max_tokens=30, seed=4)
    prompt = prompt_of(20)
    stats = Stats()
    first = speculate(target, drafts["itself"], prompt, settings, 3, stats=stats)
    assert first == speculate(target, drafts["itself"], prompt, settings, 3)
    assert len(first) == 30 and all(0 <= t < 1000 for t in first)
    assert stats.acceptance_rate > 0.99  # p == q: every draft is kept
    other = Stats()
    speculate(target, drafts["near"], prompt, settings, 3, stats=other)
    assert 0 < other.acceptance_rate < 1


# ---- the library: stream / generate / Chat (the 270M's tokenizer) -------------------------------

TEXT = dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=262144,
            sliding_window=16, sliding_window_pattern=2, query_pre_attn_scalar=32,
            max_position_embeddings=512, rms_norm_eps=1e-6, torch_dtype="float32")


@pytest.fixture(scope="module")
def chatty(model_270m):
    """A tiny target and a near copy as its draft, with the real tokenizer (window 16)."""
    model = lively(TEXT, 0, model_270m.tokenizer, "tiny")
    return model, lively(TEXT, 1, model_270m.tokenizer, "tiny-draft", like=model, noise=0.05)


def cache_holds(model: Model, cache: list, ids: list[int]) -> bool:
    """Whether the cache behaves as a fresh one that read `ids` (checked by the next logits;
    this uses the cache up)."""
    fresh = model.make_cache()
    prefill(model, ids, fresh)
    probe = [7, 8, 9]
    return mx.abs(next_logits(model, cache, probe) - next_logits(model, fresh, probe)).max() < 1e-4


@pytest.fixture(scope="module")
def chatty_wide(model_270m):
    """As `chatty` with a 512-token window: the caches never wrap, so undo and retry trim."""
    wide = {**TEXT, "sliding_window": 512}
    model = lively(wide, 0, model_270m.tokenizer, "tiny-wide")
    return model, lively(wide, 1, model_270m.tokenizer, "tiny-wide-draft", like=model,
                         noise=0.05)


@pytest.mark.parametrize("pair, kv_bits", [("chatty", None), ("chatty_wide", None),
                                           ("chatty", 8)])
def test_chat_with_a_draft_replies_as_without_and_keeps_both_caches(request, pair, kv_bits):
    model, draft = request.getfixturevalue(pair)
    plain_chat = Chat(model, system="Be brief.", temp=0, max_tokens=12, kv_bits=kv_bits)
    chat = Chat(model, system="Be brief.", temp=0, max_tokens=12, draft_model=draft,
                num_draft_tokens=3, kv_bits=kv_bits)
    for text in ["Hello!", "What is the capital of France?", "Why?"]:
        assert chat.send(text) == plain_chat.send(text)
        assert chat.session.ids == plain_chat.session.ids
        assert chat.session.prefilled_tokens == plain_chat.session.prefilled_tokens
        assert len(chat.session.draft_ids) == cache_offset(chat.session.draft_cache)
        assert chat.session.draft_ids == chat.session.ids[:len(chat.session.draft_ids)]
    window = model.config.text.sliding_window
    assert (cache_offset(chat.session.cache) > 3 * window) == (window == 16)  # the rings wrapped
    chat.undo()
    plain_chat.undo()
    assert chat.send("Tell me a joke.") == plain_chat.send("Tell me a joke.")
    if window == 512:  # both caches were trimmed, not rebuilt
        assert chat.session.prefilled_tokens < len(chat.session.ids) // 2
    retried = "".join(c.text for c in chat.retry())
    assert retried == chat.messages[-1].text == plain_chat.messages[-1].text
    sampled = "".join(c.text for c in chat.retry(temp=1.0, seed=3))
    assert chat.messages[-1].text == sampled
    plain_chat.messages = list(chat.messages)
    assert chat.send("More.") == plain_chat.send("More.")
    assert cache_holds(draft, chat.session.draft_cache, chat.session.draft_ids)
    if kv_bits is None:  # (a quantized cache reads a little differently from a fresh prefill)
        assert cache_holds(model, chat.session.cache, chat.session.ids)


@pytest.mark.parametrize("after", [1, 2, 3, 5])
@pytest.mark.parametrize("how", ["should_stop", "close"])
def test_a_reply_stopped_mid_round_keeps_both_caches_true(chatty, after, how):
    model, draft = chatty
    chat = Chat(model, temp=0, max_tokens=12, draft_model=draft, num_draft_tokens=4)
    chat.send("Hello!")
    chunks = []
    stream = chat.stream("Tell me a story.", should_stop=lambda: len(chunks) >= after)
    if how == "close":  # the caller stops reading
        chunks += [next(stream) for _ in range(after)]
        stream.close()
    else:
        for chunk in stream:
            chunks.append(chunk)
        assert chunks[-1].finish_reason == "cancelled"
    assert chat.messages[-1].stopped
    assert len(chat.session.ids) == cache_offset(chat.session.cache)
    assert len(chat.session.draft_ids) == cache_offset(chat.session.draft_cache)
    plain_chat = Chat(model, temp=0, max_tokens=12)
    plain_chat.messages = list(chat.messages)
    assert chat.send("Go on.") == plain_chat.send("Go on.")
    assert cache_holds(draft, chat.session.draft_cache, chat.session.draft_ids)


def test_stream_and_generate_take_a_draft(chatty):
    model, draft = chatty
    expected = gemma_mlx.generate(model, "Once upon a time", temp=0, max_tokens=10)
    assert gemma_mlx.generate(model, "Once upon a time", temp=0, max_tokens=10,
                              draft_model=draft) == expected
    chunks = list(gemma_mlx.stream(model, "Once upon a time", temp=0, max_tokens=10,
                                   draft_model=draft, num_draft_tokens=2))
    stats = chunks[-1].stats
    assert stats.drafted_tokens > 0 and 0 < stats.acceptance_rate <= 1
    assert "draft acceptance" in stats.summary()


def test_a_draft_reads_image_soft_tokens_as_pad(model_270m, chatty):
    """A 4B+ target's image soft tokens (id 262144) are past a text draft's vocabulary."""
    vision = dict(model_type="gemma3", text_config={**TEXT, "vocab_size": 262208},
                  vision_config=dict(image_size=28, patch_size=14, hidden_size=32,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64), mm_tokens_per_image=4)
    model = lively(vision, 0, model_270m.tokenizer, "tiny-vision")
    _, draft = chatty
    image = np.zeros((30, 40, 3), np.uint8)
    from PIL import Image

    picture = Image.fromarray(image + 200)
    expected = Chat(model, temp=0, max_tokens=8).send("What is this?", images=[picture])
    chat = Chat(model, temp=0, max_tokens=8, draft_model=draft)
    assert chat.send("What is this?", images=[picture]) == expected
    assert 262144 in chat.session.draft_ids
    assert Draft(draft).readable([5, 262144, 262207]) == [5, 0, 0]
    # Sampling with a draft of fewer ids (its q is padded), and the other way round (drafting
    # stays within the text model's vocabulary).
    sampled = Chat(model, max_tokens=8, seed=2, draft_model=draft)
    assert sampled.send("Hi", images=[picture]) and sampled.messages[-1].token_ids
    text_model, _ = chatty
    for settings in (dict(temp=0), dict(seed=2)):
        expected = gemma_mlx.generate(text_model, "Hi", max_tokens=8, **settings)
        got = gemma_mlx.generate(text_model, "Hi", max_tokens=8, draft_model=model, **settings)
        assert got == expected or "seed" in settings


# ---- bad input ---------------------------------------------------------------------------------

def test_a_draft_with_another_vocabulary_is_one_clear_error(chatty, target):
    model, _ = chatty
    with pytest.raises(BadRequest, match="another vocabulary .* use a Gemma 3 draft model"):
        Chat(model, draft_model=target)
    with pytest.raises(BadRequest, match="another vocabulary"):
        gemma_mlx.generate(model, "Hi", draft_model=target)


def test_a_draft_with_another_tokenizer_is_one_clear_error(chatty):
    model, draft = chatty

    class Other:
        def encode(self, text: str) -> list[int]:
            return [ord(c) for c in text]

    impostor = Model(draft.net, Other(), Path("x"), None, name="impostor")
    with pytest.raises(BadRequest, match="impostor has another tokenizer than tiny"):
        gemma_mlx.load_draft(impostor, model)
    assert gemma_mlx.load_draft(draft, model) is draft


@pytest.mark.parametrize("n", [0, -1, 65])
def test_a_bad_number_of_draft_tokens_is_refused(chatty, n):
    model, draft = chatty
    with pytest.raises(BadRequest, match="number of draft tokens"):
        Chat(model, draft_model=draft, num_draft_tokens=n)


# ---- the real 270M -----------------------------------------------------------------------------

def test_270m_as_its_own_draft_accepts_every_greedy_draft(model_270m):
    prompt = model_270m.tokenizer.encode("The capital of France is")
    settings = SamplingSettings(temp=0.0, max_tokens=12)
    expected = list(generate_tokens(model_270m, prompt, model_270m.make_cache(), settings,
                                    Stats()))
    stats = Stats()
    assert speculate(model_270m, model_270m, prompt, settings, 3, stats=stats) == expected
    assert stats.acceptance_rate == 1.0 and stats.drafted_tokens == 3 + 3 + 2  # 1 + 4 + 4 + 3


def test_270m_with_a_tiny_draft_equals_plain_decoding(model_270m):
    draft = lively(TEXT, 3, model_270m.tokenizer, "tiny")
    prompt = model_270m.tokenizer.encode("def fibonacci(n):\n")
    settings = SamplingSettings(temp=0.0, max_tokens=10)
    expected = list(generate_tokens(model_270m, prompt, model_270m.make_cache(), settings,
                                    Stats()))
    assert speculate(model_270m, draft, prompt, settings, 2) == expected


def test_cli_drafts_and_reports_the_acceptance_rate(capsys):
    from gemma_mlx.cli import main

    args = ["-m", "270m", "The capital of France is", "--temp", "0", "--max-tokens", "8"]
    assert main(args) == 0
    expected = capsys.readouterr().out
    assert main([*args, "--draft-model", "270m", "--num-draft-tokens", "2", "-v"]) == 0
    out, err = capsys.readouterr()
    assert out == expected
    assert "draft acceptance 100% (" in err
    assert main([*args, "--num-draft-tokens", "2"]) == 1
    assert "--num-draft-tokens needs --draft-model" in capsys.readouterr().err


# ---- the chat app ------------------------------------------------------------------------------

def test_the_app_drafts_with_a_draft_model_and_shows_it(chatty):
    from test_tui import SIZE, RecordingApp, exchange, run, status, views

    model, draft = chatty
    expected = Chat(model, temp=0, max_tokens=6).send("Hello")

    async def scenario():
        app = RecordingApp(model, sampling=dict(temp=0, max_tokens=6), draft_model=draft,
                           num_draft_tokens=2)
        async with app.run_test(size=SIZE) as pilot:
            await exchange(pilot, "Hello")
            assert app.chat.draft_model is draft and app.chat.num_draft_tokens == 2
            assert views(app)[-1] == ("assistant", expected)
            assert "draft tiny-draft" in status(app)
            assert app.last_stats.drafted_tokens > 0

    run(scenario)


def test_the_app_goes_on_without_a_draft_that_does_not_fit(chatty, target):
    from test_tui import SIZE, RecordingApp, exchange, run

    model, _ = chatty

    async def scenario():
        app = RecordingApp(model, sampling=dict(temp=0, max_tokens=4), draft_model=target)
        async with app.run_test(size=SIZE) as pilot:
            assert "another vocabulary" in app.notices[-1]
            await exchange(pilot, "Hello")
            assert app.chat.draft_model is None and len(app.chat.messages) == 2

    run(scenario)


def test_chat_command_passes_the_draft_options(monkeypatch, capsys):
    from gemma_mlx.cli import main
    from tui.app import ChatApp

    made = {}

    def fake_run(self):
        made.update(draft=self.draft_model, n=self.num_draft_tokens)

    monkeypatch.setattr(ChatApp, "run", fake_run)
    assert main(["chat", "-m", "4b", "--draft-model", "270m", "--num-draft-tokens", "2"]) == 0
    assert made == dict(draft="270m", n=2)
    assert main(["chat", "--draft-model", "270m", "--num-draft-tokens", "0"]) == 1
    assert "number of draft tokens must be between 1 and 64 (got 0)" in capsys.readouterr().err


# ---- bench -------------------------------------------------------------------------------------

BENCH = ["bench", "--random", "tiny", "--prompt-tokens", "16,40", "--gen-tokens", "12",
         "--repeats", "2"]


def test_bench_reports_acceptance_and_speedup_beside_plain_decoding(capsys):
    import json

    from gemma_mlx.cli import main

    assert main([*BENCH, "--draft-model", "tiny", "--num-draft-tokens", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["peer"] == "speculative"
    assert report["draft"] == {"model": "random tiny (4-bit g64)", "num_draft_tokens": 2}
    for entry in report["results"]:
        spec = entry["speculative"]
        assert spec["acceptance_rate"] == 1.0  # the model as its own draft
        # 12 tokens: 1, then 3 + 3 + 3 (2 drafts each), then 2 (1 draft); two repeats
        assert spec["drafted_tokens"] == spec["accepted_tokens"] == 2 * (2 + 2 + 2 + 1)
        assert spec["speedup"] == pytest.approx(
            entry["peer"]["decode_tps"] / entry["ours"]["decode_tps"])
        assert entry["peer"]["generated_tokens"] == 12
    assert main([*BENCH, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["draft"] is None and all(e["speculative"] is None for e in report["results"])
    assert main([*BENCH, "--draft-model", "tiny", "--repeats", "1"]) == 0
    assert "draft random tiny (4-bit g64) accepted 100% of" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--draft-model", "tiny", "--compare", "mlx-lm"], "leave out --compare"),
    (["--draft-model", "7b"], "with --random, --draft-model is a shape too"),
    (["--num-draft-tokens", "2"], "--num-draft-tokens needs --draft-model"),
    (["--draft-model", "tiny", "--num-draft-tokens", "0"], "number of draft tokens"),
])
def test_bench_draft_options_are_checked(capsys, extra, message):
    from gemma_mlx.cli import main

    assert main([*BENCH, *extra]) == 1
    assert message in capsys.readouterr().err
