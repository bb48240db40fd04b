"""The generation engine: chunked prefill, pipelined decode, sampling, stopping, statistics.

It knows token ids and caches, nothing of messages. Samplers and logits processors are
mlx-lm's; caches are mlx-lm's (rotating ones for the sliding-window layers); text comes out
through mlx-lm's streaming detokenizer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from mlx_lm.generate import wired_limit
from mlx_lm.sample_utils import make_logits_processors

from .errors import BadRequest, ContextOverflow
from .loading import Model
from .model.decode import compiled_decode
from .sampling import SeedKeys, make_sampler

if TYPE_CHECKING:
    from .constrain import Constraint

# Tokens per prefill pass. 2048, as mlx-lm's default: on an H100 (4B, 4096-token prompt) 512
# ran at 0.6x the speed of 2048 and 1024 at 0.8x (benchmarks/RESULTS.md); larger chunks cost
# activation memory.
PREFILL_CHUNK = 2048
SPECULATION_OFF = ("speculative decoding is off for this reply: its tokens follow a grammar "
                   "(JSON schema or tool calls), which the draft model's proposals do not")


@dataclass
class SamplingSettings:
    """Gemma's recommended sampling by default; temp 0 is greedy."""

    temp: float = 1.0
    top_p: float = 0.95
    top_k: int = 64
    min_p: float = 0.0
    repetition_penalty: float | None = None
    max_tokens: int = 1024
    seed: int | None = None

    def validate(self) -> None:
        if self.max_tokens <= 0:
            raise BadRequest(f"max tokens must be at least 1 (got {self.max_tokens})")
        if self.temp < 0:
            raise BadRequest(f"temperature must be 0 (greedy) or more (got {self.temp})")
        if not 0.0 <= self.top_p <= 1.0:
            raise BadRequest(f"top-p must be between 0 and 1 (got {self.top_p})")
        if self.top_k < 0:
            raise BadRequest(f"top-k must be 0 (off) or more (got {self.top_k})")
        if not 0.0 <= self.min_p <= 1.0:
            raise BadRequest(f"min-p must be between 0 and 1 (got {self.min_p})")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise BadRequest(f"repetition penalty must be above 0 (got {self.repetition_penalty})")


@dataclass
class Stats:
    """Running figures of one generation; seconds, tokens per second and bytes."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    peak_memory: int = 0
    drafted_tokens: int = 0  # speculative decoding: tokens the draft model proposed
    accepted_tokens: int = 0  # ... and those of them the model accepted
    constraint_seconds: float = 0.0  # host time computing grammar masks (beside the device's)

    @property
    def time_to_first_token(self) -> float:
        return self.prompt_seconds

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        """Tokens after the first over the time after the first: the steady decode speed."""
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds else 0.0

    @property
    def acceptance_rate(self) -> float:
        """The share of drafted tokens accepted (0 without a draft model)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    def summary(self) -> str:
        draft = (f", draft acceptance {self.acceptance_rate:.0%} ({self.accepted_tokens}/"
                 f"{self.drafted_tokens})" if self.drafted_tokens else "")
        return (f"prompt {self.prompt_tokens} tok at {self.prompt_tps:.1f} tok/s, "
                f"first token {self.time_to_first_token:.2f} s, decode "
                f"{self.generated_tokens} tok at {self.decode_tps:.1f} tok/s{draft}, "
                f"peak memory {self.peak_memory / 2**30:.2f} GB")


@dataclass
class Chunk:
    """One step of a stream: the new text (may be empty mid-character), its token, the stats.
    The last chunk has a finish_reason, and as its token the stop token if one ended it."""

    text: str
    token: int | None
    stats: Stats
    finish_reason: str | None = None  # "stop", "length" or "cancelled" on the last chunk
    tokens: list[int] = field(default_factory=list)  # every generated token so far
    notices: list[str] = field(default_factory=list)  # what the user should be told
    tool_calls: list = field(default_factory=list)  # the last chunk's, when the reply calls
    logprob: float | None = None  # with `logprobs`: the token's log-probability ...
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # ... and the top ones


class Logprobs:
    """Log-probabilities of each sampled token (and of the `top` likeliest), as the model gives
    them before sampling's filters and temperature. Recorded on the device with each step and
    read in order as the tokens are, so the pipelined decode never waits for them."""

    def __init__(self, top: int = 0):
        self.top = top
        self._pending: list[tuple[mx.array, ...]] = []

    def record(self, logprobs: mx.array, token: mx.array) -> list[mx.array]:
        """Queue this step's figures; returns the arrays to evaluate with the token."""
        arrays = [logprobs[token]]
        if self.top:
            ids = mx.argpartition(-logprobs, self.top - 1)[:self.top]
            arrays += [ids, logprobs[ids]]
        self._pending.append(tuple(arrays))
        return arrays

    def pop(self) -> tuple[float, list[tuple[int, float]]]:
        """The oldest queued step's (logprob, [(id, logprob)] likeliest first)."""
        chosen, *top = self._pending.pop(0)
        pairs = []
        if top:
            pairs = sorted(zip(top[0].tolist(), top[1].tolist(), strict=True),
                           key=lambda pair: -pair[1])
        return chosen.item(), pairs


class PrefillStopped(Exception):
    """`should_stop` said stop between two prefill chunks (the cache holds those before)."""


def prefill(model: Model, ids: Sequence[int], cache: list, chunk: int | None = None,
            image_features: mx.array | None = None,
            should_stop: Callable[[], bool] | None = None) -> mx.array:
    """Run the prompt through the model in chunks; return the last position's logits [vocab].
    `should_stop` is asked before each chunk: a long prompt can be stopped too
    (PrefillStopped)."""
    chunks = prefill_chunks(model, ids, cache, chunk, image_features)
    while True:
        if should_stop is not None and should_stop():
            raise PrefillStopped
        logits = next(chunks)
        if logits is not None:
            return logits


def prefill_chunks(model: Model, ids: Sequence[int], cache: list, chunk: int | None = None,
                   image_features: mx.array | None = None) -> Iterator[mx.array | None]:
    """The prefill one chunk at a time (so that a batch can decode between them): None after
    each chunk but the last, then the last position's logits [vocab].

    A chunk never ends inside an image (its tokens attend to each other both ways), and each
    chunk gets the soft tokens of the images it holds. Only the last position goes through
    the output head (262k columns)."""
    image_token = model.config.image_token_index
    chunk = chunk or PREFILL_CHUNK
    ids = list(ids)
    start, images_done = 0, 0
    per_image = model.config.mm_tokens_per_image
    while True:
        end = chunk_end(ids, start, chunk, image_token)
        n_images = sum(1 for t in ids[start:end] if t == image_token) // per_image
        features = None
        if image_features is not None and n_images:
            features = image_features[images_done:images_done + n_images]
        images_done += n_images
        h = model.net.hidden(mx.array(ids[start:end])[None], cache, features, eval_layers=True)
        if end == len(ids):
            yield model.net.logits(h[:, -1, :])[0]
            return
        mx.eval([c.state for c in cache])
        mx.clear_cache()
        yield None
        start = end


def chunk_end(ids: Sequence[int], start: int, chunk: int, image_token: int) -> int:
    """`start + chunk`, moved back to the start of an image it would cut (or, when the image
    began before `start`, forward to its end)."""
    end = min(start + chunk, len(ids))
    if end == len(ids) or not (ids[end - 1] == image_token == ids[end]):
        return end
    back = end
    while back > start and ids[back - 1] == image_token:
        back -= 1
    if back > start:
        return back
    while end < len(ids) and ids[end] == image_token:
        end += 1
    return end


def generate_tokens(model: Model, prompt: Sequence[int], cache: list,
                    settings: SamplingSettings, stats: Stats,
                    image_features: mx.array | None = None,
                    compiled: bool = True,
                    should_stop: Callable[[], bool] | None = None,
                    logprobs: Logprobs | None = None,
                    constraint: Constraint | None = None) -> Iterator[int]:
    """Yield sampled token ids (`should_stop` can end the prefill: PrefillStopped; `logprobs`
    records each token's log-probabilities, in order, for the caller to read). Decode is
    pipelined: step n+1 is queued with `mx.async_eval` before step n's token is read, so Python
    and the device overlap. Each decode step is one compiled graph (`model.decode.compiled_decode`)
    where the caches allow; `compiled=False` decodes op by op through the model instead (the
    reference the compiled path must equal). A `constraint` (constrain.py) masks each step's
    logits to the tokens its grammar allows (logprobs stay the model's own, before the mask)."""
    keys = SeedKeys(settings.seed)
    sampler = make_sampler(settings.temp, settings.top_p, settings.min_p, settings.top_k)
    processors = make_logits_processors(repetition_penalty=settings.repetition_penalty)
    history = mx.array(prompt)

    def sample(logits: mx.array, allowed: mx.array | None = None) -> mx.array:
        nonlocal history
        raw = logits
        if allowed is not None:
            logits = mx.where(allowed, logits, -mx.inf)
        for processor in processors:
            logits = processor(history, logits[None])[0]
        draw = keys.next() if settings.temp != 0 else None
        token = model.agree(sampler((logits - mx.logsumexp(logits))[None], draw))
        if processors:
            history = mx.concatenate([history, token])
        if logprobs is not None:
            mx.async_eval(logprobs.record(raw - mx.logsumexp(raw), token[0]))
        return token

    fast = None

    def forward(token: mx.array) -> mx.array:
        if fast is not None:
            return fast.step(token, cache)
        return model.net.logits(model.net.hidden(token[None], cache)[:, -1, :])[0]

    start = time.perf_counter()
    logits = prefill(model, prompt, cache, image_features=image_features,
                     should_stop=should_stop)
    if constraint is not None:
        mx.async_eval(logits)  # the first mask is computed while the prompt runs
    token = sample(logits, constraint.mask() if constraint is not None else None)
    if compiled:
        fast = compiled_decode(model.net.decoder, cache)
    mx.eval(token)
    stats.prompt_tokens = len(prompt)
    stats.prompt_seconds = time.perf_counter() - start
    if constraint is not None:
        yield from _constrained(token, forward, sample, constraint, settings.max_tokens, stats)
        return
    decode_start = time.perf_counter()
    for n in range(settings.max_tokens):
        if n + 1 < settings.max_tokens:
            next_token = sample(forward(token))
            mx.async_eval(next_token)
        stats.generated_tokens = n + 1
        stats.decode_seconds = time.perf_counter() - decode_start
        yield token.item()  # the caller stops by no longer reading (or closing the generator)
        if n + 1 < settings.max_tokens:
            token = next_token
        if n % 256 == 255:
            mx.clear_cache()


def _constrained(token: mx.array, forward: Callable, sample: Callable, constraint: Constraint,
                 max_tokens: int, stats: Stats) -> Iterator[int]:
    """The decode loop with a constraint, pipelined as plain decoding is. Step n+1's mask needs
    step n's token on the host, but its forward pass needs the token only on the device: the
    forward pass of n+1 is queued before the token is read, the mask is computed while the
    device runs that pass, and the masked sampling of n+1 and the forward pass of n+2 are queued
    before the token goes to the caller. The device waits for the host only where the mask takes
    longer than a forward pass. (Reading each token before queueing the next pass, with the mask
    on a worker thread, left the device idle for each round trip: 0.83-0.93x of plain decoding
    against 0.99-1.01x this way on `bench --random tiny-vocab`, this CPU.)"""
    decode_start = time.perf_counter()
    logits = forward(token) if max_tokens > 1 else None
    if logits is not None:
        mx.async_eval(logits)
    for n in range(max_tokens):
        t = token.item()
        constraint.advance(t)
        if n + 1 < max_tokens:
            token = sample(logits, constraint.mask())
            mx.async_eval(token)
            logits = forward(token) if n + 2 < max_tokens else None
            if logits is not None:
                mx.async_eval(logits)
        stats.generated_tokens = n + 1
        stats.decode_seconds = time.perf_counter() - decode_start
        stats.constraint_seconds = constraint.seconds
        yield t
        if n % 256 == 255:
            mx.clear_cache()


def add_token(detok: Any, token: int) -> None:
    """Feed mlx-lm's streaming detokenizer one id. A vision model's embedding has 64 rows more
    than Gemma's tokenizer has tokens (the image soft token and unused ids), which untrained or
    odd weights may sample: such an id reads as no text, as an unknown token would, instead of
    failing the generation."""
    tokenmap = getattr(detok, "tokenmap", None)
    if tokenmap is None or token < len(tokenmap):
        detok.add_token(token)


def cache_offset(cache: list) -> int:
    """How many tokens the cache has seen (every layer's cache counts the same)."""
    return cache[0].offset if cache else 0


def stream_tokens(model: Model, prompt: Sequence[int], settings: SamplingSettings,
                  cache: list | None = None,
                  should_stop: Callable[[], bool] = lambda: False,
                  image_features: mx.array | None = None,
                  context_limit: int | None = None, draft: Any = None,
                  logprobs: int | None = None,
                  constraint: Constraint | None = None) -> Iterator[Chunk]:
    """Generate from prompt ids (the tokens after those already in `cache`), yielding text
    chunks; stops at <end_of_turn> / <eos>, at max_tokens or at the context limit. With a
    `speculative.Draft`, its draft model proposes tokens that the model checks. `logprobs`
    (0 for the chosen token's only, or how many of the likeliest) fills the chunks' logprobs.
    A `constraint` (constrain.py) keeps the reply to its grammar, and turns drafting off (a
    notice says so: the draft's proposals would not be checked against the grammar)."""
    settings.validate()
    if logprobs is not None and draft is not None:
        raise BadRequest("log-probabilities are not reported with a draft model: leave out one")
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise BadRequest(f"top logprobs must be between 0 and 20 (got {logprobs})")
    if len(prompt) == 0:
        raise BadRequest("the prompt is empty: give some text to complete")
    cache = cache if cache is not None else model.make_cache()
    limit = context_limit or model.context_limit
    used = cache_offset(cache) + len(prompt)
    if used >= limit:
        raise ContextOverflow(f"the prompt is {used} tokens but the context window holds "
                              f"{limit}: shorten the prompt")
    settings = replace(settings, max_tokens=min(settings.max_tokens, limit - used))
    stop_ids = set(model.config.eos_token_ids)
    detok = model.tokenizer.detokenizer
    detok.reset()
    stats = Stats()
    mx.reset_peak_memory()
    tokens: list[int] = []
    notices: list[str] = []
    finish, stop_token = "length", None
    if draft is not None and constraint is not None:
        notices.append(SPECULATION_OFF)
        draft = None
    if draft is not None and model.sharding is not None:
        raise BadRequest("speculative decoding does not run across several machines: leave "
                         "out the draft model")
    # On Metal, keep the weights wired while generating, as mlx-lm does (a no-op elsewhere).
    recorder = Logprobs(logprobs) if logprobs is not None else None
    extra = {"logprobs": recorder} if recorder is not None else {}
    if draft is not None:
        ids = draft.tokens(model, prompt, cache, settings, stats, image_features=image_features,
                           should_stop=should_stop, **extra)
    elif model.leader is not None:  # rank 0 of a distributed run: the other ranks follow it
        ids = model.leader.generate_tokens(prompt, cache, settings, stats,
                                           image_features=image_features,
                                           should_stop=should_stop, constraint=constraint,
                                           **extra)
    else:
        ids = generate_tokens(model, prompt, cache, settings, stats,
                              image_features=image_features, should_stop=should_stop,
                              constraint=constraint, **extra)
    # Closed on leaving the loop (a draft then rolls both caches back to the tokens read).
    with wired_limit(model.net), closing(ids):
        # should_stop is asked once per token, here (asking twice could see it change between
        # the two and end the reply as "length" instead of "cancelled").
        try:
            for token in ids:
                scores = recorder.pop() if recorder is not None else (None, [])
                if token in stop_ids:
                    finish, stop_token = "stop", token
                    break
                tokens.append(token)
                add_token(detok, token)
                stats.peak_memory = mx.get_peak_memory()
                yield Chunk(detok.last_segment, token, stats, tokens=tokens, logprob=scores[0],
                            top_logprobs=scores[1], notices=notices)
                if should_stop():
                    finish = "cancelled"
                    break
        except PrefillStopped:
            finish = "cancelled"
    detok.finalize()
    stats.peak_memory = mx.get_peak_memory()
    yield Chunk(detok.last_segment, stop_token, stats, finish_reason=finish, tokens=tokens,
                notices=notices)
