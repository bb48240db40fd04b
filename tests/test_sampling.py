"""The sampler keeps exactly the tokens mlx-lm's filter chain keeps, and a seed draws the same
token through either, over Gemma's real vocabulary size."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

from gemma_mlx.engine import SamplingSettings
from gemma_mlx.sampling import filter_logprobs, make_sampler
from gemma_mlx.speculative import Rule

VOCAB = 262_144
SETTINGS = [  # (top_p, min_p, top_k): Gemma's defaults, each filter deciding, none
    (0.95, 0.0, 64), (0.5, 0.0, 64), (0.999, 0.0, 8), (0.0, 0.05, 64), (0.9, 0.1, 64),
    (0.0, 0.0, 64), (0.95, 0.0, 0), (0.0, 0.0, 0), (1.0, 0.0, 3),
]


def logprobs(seed: int, peaked: float) -> mx.array:
    """[2, vocab]: one flat row, one with a few likely tokens (where top-p cuts early)."""
    mx.random.seed(seed)
    logits = mx.random.normal((2, VOCAB))
    logits[1, :20] += peaked * mx.arange(20, 0, -1).astype(mx.float32) / 20
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def mlx_lm_kept(x: mx.array, top_p: float, min_p: float, top_k: int) -> mx.array:
    """Which tokens mlx-lm's chain keeps: its filters in the order its make_sampler applies
    them."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    if 0 < top_p < 1:
        x = apply_top_p(x, top_p)
    if min_p:
        x = apply_min_p(x, min_p)
    if top_k:
        x = apply_top_k(x, top_k)
    return x > -mx.inf


@pytest.mark.parametrize("top_p,min_p,top_k", SETTINGS)
def test_the_kept_tokens_are_mlx_lms(top_p, min_p, top_k):
    for seed, peaked in ((0, 0.0), (1, 12.0), (2, 30.0)):
        x = logprobs(seed, peaked)
        ours = filter_logprobs(x, top_p, min_p, top_k) > -mx.inf
        theirs = mlx_lm_kept(x, top_p, min_p, top_k)
        assert mx.array_equal(ours, theirs).item(), (seed, ours.sum(-1), theirs.sum(-1))
        assert ours.sum().item() >= 2  # something is kept in each row


def test_a_seed_draws_what_mlx_lms_sampler_draws():
    x = logprobs(3, 8.0)[1:]
    for temp, top_p, min_p, top_k in ((1.0, 0.95, 0.0, 64), (0.7, 0.9, 0.05, 40),
                                      (1.3, 0.0, 0.0, 0)):
        ours, theirs = [], []
        for draws, sampler in ((ours, make_sampler(temp, top_p, min_p, top_k)),
                               (theirs, mlx_lm_sampler(temp, top_p, min_p, top_k=top_k))):
            mx.random.seed(11)
            draws += [sampler(x).item() for _ in range(20)]
        assert ours == theirs and len(set(ours)) > 1


def test_the_speculative_rule_samples_from_the_same_distribution():
    settings = SamplingSettings(temp=0.8, top_p=0.9, top_k=64)
    rule = Rule(settings)
    x = logprobs(4, 10.0)[1]
    p = rule.distribution(x[None])[0]
    kept = filter_logprobs(x, 0.9, 0.0, 64) > -mx.inf
    assert mx.array_equal(p > 0, kept).item()
    assert abs(p.sum().item() - 1) < 1e-5
