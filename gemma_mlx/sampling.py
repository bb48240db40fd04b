"""Sampling: mlx-lm's filters (top-p, then min-p, then top-k, as its `make_sampler` chains
them) and its draw, softmax(logprobs / temp), without sorting the whole vocabulary.

mlx-lm's top-p sorts all 262,144 log-probabilities at every token: 50 ms on a two-core x86
CPU, where a 270M decode step takes about 250 ms. Each of the three filters keeps the likeliest
tokens down to a cut, so with top-k on (Gemma's default, 64) what survives lies among the k
likeliest: those are found by a partition, and top-p (against the whole vocabulary's mass) and
min-p are decided among them. The kept set, and so the token a seed draws, is mlx-lm's, ties at
the cut aside (tests/test_sampling.py holds it to mlx-lm's filters). Without top-k, mlx-lm's own
filters run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_p


def filter_logprobs(logprobs: mx.array, top_p: float = 0.0, min_p: float = 0.0,
                    top_k: int = 0) -> mx.array:
    """`logprobs` [..., vocab] (normalised) with the tokens the filters drop at -inf."""
    if not 0 < top_k < logprobs.shape[-1]:
        if 0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p != 0.0:
            logprobs = apply_min_p(logprobs, min_p)
        return logprobs
    likeliest = mx.sort(mx.topk(logprobs, top_k, axis=-1), axis=-1)[..., ::-1]  # descending
    keep = mx.ones(likeliest.shape, dtype=mx.bool_)
    if 0 < top_p < 1.0:
        total = mx.exp(logprobs.astype(mx.float32)).sum(axis=-1, keepdims=True)
        probs = mx.exp(likeliest.astype(mx.float32))
        mass_above = mx.cumsum(probs, axis=-1) - probs
        keep = keep & (mass_above < top_p * total)
    if min_p != 0.0:
        keep = keep & (likeliest >= likeliest[..., :1] + math.log(min_p))
    last = mx.maximum(keep.sum(axis=-1, keepdims=True) - 1, 0)
    threshold = mx.take_along_axis(likeliest, last, axis=-1)
    return mx.where(logprobs < threshold, -mx.inf, logprobs)


class SeedKeys:
    """A seed's own random key sequence: what `mx.random.seed(seed)` gives the process's random
    state, kept apart so that nothing else drawing in between (another run, another stream of
    a batch) changes a seeded run's draws. Without a seed, `next()` is None: the process's
    state."""

    def __init__(self, seed: int | None):
        self._key = mx.random.key(seed) if seed is not None else None

    def next(self) -> mx.array | None:
        if self._key is None:
            return None
        self._key, key = mx.random.split(self._key)
        return key


def make_sampler(temp: float, top_p: float = 0.0, min_p: float = 0.0,
                 top_k: int = 0) -> Callable[[mx.array], mx.array]:
    """A function from log-probabilities [..., vocab] to tokens [...]: argmax at temp 0, else
    a draw from the filtered distribution (`key`: a stream's own random key)."""
    if temp == 0:
        return lambda logprobs, key=None: mx.argmax(logprobs, axis=-1)

    def sample(logprobs: mx.array, key: mx.array | None = None) -> mx.array:
        kept = filter_logprobs(logprobs, top_p, min_p, top_k)
        return mx.random.categorical(kept * (1.0 / temp), key=key)

    return sample


def distribution(logprobs: mx.array, temp: float, top_p: float = 0.0, min_p: float = 0.0,
                 top_k: int = 0) -> mx.array:
    """The distribution [..., vocab] (float32) `make_sampler` draws from."""
    kept = filter_logprobs(logprobs, top_p, min_p, top_k)
    return mx.softmax(kept.astype(mx.float32) * (1.0 / temp), axis=-1)
