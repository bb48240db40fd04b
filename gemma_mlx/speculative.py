"""Speculative decoding: a small draft model proposes a few tokens, the target model checks them
all in one forward pass and keeps the run it agrees with, plus one token of its own.

The output is the target's own. Greedy (temp 0): token for token what plain decoding gives.
Sampling: drawn from the same distribution, by the speculative sampling rule (Leviathan et al.
2023; Chen et al. 2023): a drafted token x is kept with probability min(1, p(x) / q(x)) and the
first one refused is replaced by a draw from max(p - q, 0), renormalised, where p and q are the
target's and the draft's distributions after the same logits processors, filters (top-p, min-p,
top-k) and temperature as the engine's sampler applies (sampling.py, mlx-lm's filters). (mlx-lm's
`speculative_generate_step` keeps a drafted token only where the target's own sample equals it:
also exact, but it keeps fewer, about sum(p q) per token instead of sum(min(p, q)); the same
where both are greedy.)

Rolling the caches back over refused tokens. Global layers' caches trim. The sliding-window
layers keep a ring of `window` entries (mlx-lm's RotatingKVCache) that mlx-lm cannot trim once
it has wrapped (each new entry overwrote the oldest), so there:
- the target reads [last token, drafts] in one multi-token pass, after which mlx-lm's rotating
  cache holds the window in temporal order (window - 1 old entries, then the new ones): dropping
  the refused entries off its end leaves a valid cache of at least `window` entries (`rewind`);
- the draft reads one token at a time, each write replacing the ring's oldest entry: before each
  such step its sliding caches are snapshotted (a new reference to the buffer, which the next
  write then copies instead of updating in place: one window per sliding layer of the small
  model) and a rollback puts back the snapshot taken before the first refused token
  (`Checkpoint`). The draft's global caches trim.

The draft reads the target's token ids; ids it has no embedding for (the 4B+ image soft tokens)
read as <pad>: it cannot see pictures, but keeps drafting the text around them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache
from mlx_lm.sample_utils import make_logits_processors

from .engine import SamplingSettings, Stats, prefill
from .errors import BadRequest
from .loading import Model
from .model.decode import compiled_decode
from .sampling import SeedKeys, distribution, make_sampler

DEFAULT_NUM_DRAFT_TOKENS = 3
MAX_NUM_DRAFT_TOKENS = 64
GEMMA3_VOCAB = 262_144  # the tokenizer's entries; 4B+ configs add 64 ids (image soft token...)
PAD = 0  # what the draft reads for ids it has no embedding for
# Text whose ids differ between tokenizers that are not Gemma 3's: turn markers, accents, CJK,
# code, digits, runs of spaces.
PROBE = ("<start_of_turn>user\nPourquoi le ciel est-il bleu ? 日本語で。 ```python\n"
         "x = [1, 22, 333]  # naïve\n```<end_of_turn>\n<start_of_turn>model\n")


# ---- the draft model ---------------------------------------------------------------------------

def check_draft(model: Model, draft: Model) -> None:
    """Raise BadRequest unless the draft reads and writes the target's token ids."""
    ours, theirs = model.config.text.vocab_size, draft.config.text.vocab_size
    fix = f"use a Gemma 3 draft model (270m, 1b) with {model.name}"
    if min(ours, GEMMA3_VOCAB) != min(theirs, GEMMA3_VOCAB):
        raise BadRequest(f"the draft model {draft.name} has another vocabulary than "
                         f"{model.name} ({theirs} vs {ours} token ids): {fix}")
    if model.tokenizer is not None and draft.tokenizer is not None:
        if model.tokenizer.encode(PROBE) != draft.tokenizer.encode(PROBE):
            raise BadRequest(f"the draft model {draft.name} has another tokenizer than "
                             f"{model.name}: {fix}")


def check_num_draft_tokens(n: int) -> None:
    if not isinstance(n, int) or not 1 <= n <= MAX_NUM_DRAFT_TOKENS:
        raise BadRequest(f"the number of draft tokens must be between 1 and "
                         f"{MAX_NUM_DRAFT_TOKENS} (got {n})")


def load_draft(draft: str | Model, model: Model, progress: Any = None, **options: Any) -> Model:
    """The draft model for `model`: loaded as `load` loads it (`options` are load's) when given
    a name (the model's own name gives the model itself), checked to share `model`'s tokenizer
    (BadRequest otherwise)."""
    if draft == model.name and not options:
        draft = model  # its own draft (to check the mechanism: every draft is accepted)
    if isinstance(draft, str):
        from .loading import load

        draft = load(draft, progress=progress, **options)
    check_draft(model, draft)
    return draft


@dataclass
class Draft:
    """A draft model for one generation: its KV cache and the ids (in the target's vocabulary)
    it has yet to read. `Draft.tokens` is the engine's token generator, drafting."""

    model: Model
    cache: list = field(default_factory=list)
    prompt: Sequence[int] = ()
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS

    def __post_init__(self) -> None:
        check_num_draft_tokens(self.num_draft_tokens)
        if not self.cache:
            self.cache = self.model.make_cache()

    def readable(self, ids: Sequence[int]) -> list[int]:
        """The ids as the draft reads them: those past its vocabulary become <pad>."""
        vocab = self.model.config.text.vocab_size
        return [t if t < vocab else PAD for t in ids]

    def tokens(self, model: Model, prompt: Sequence[int], cache: list,
               settings: SamplingSettings, stats: Stats,
               image_features: mx.array | None = None,
               compiled: bool = True,
               should_stop: Callable[[], bool] | None = None) -> Iterator[int]:
        """Yield the target's tokens as `engine.generate_tokens` does (same arguments), drafting
        `num_draft_tokens` at a time. When the caller stops reading, both caches are left
        holding the prompt and the tokens it read (the last one maybe not), as after plain
        decoding, so a conversation can keep them."""
        rule = Rule(settings, model.config.text.vocab_size)
        history = list(prompt)  # for the logits processors (repetition penalty)
        start = time.perf_counter()
        logits = prefill(model, prompt, cache, image_features=image_features,
                         should_stop=should_stop)
        first = rule.sample(rule.logprobs(logits, history))
        if self.prompt:  # the draft reads the prompt too: its time counts in the first token's
            prefill(self.model, self.readable(self.prompt), self.cache)
        mx.eval(first, [c.state for c in self.cache])
        # The draft's one-token steps run compiled (made once: checking it is not free).
        fast = compiled_decode(self.model.net.decoder, self.cache) if compiled else None
        stats.prompt_tokens = len(prompt)
        stats.prompt_seconds = time.perf_counter() - start
        decode_start = time.perf_counter()
        token = first.item()
        stats.generated_tokens = 1
        yield token
        history.append(token)
        unread = [token]  # read by neither model but the first; the last is read by neither
        generated = 1
        while generated < settings.max_tokens:
            k = min(self.num_draft_tokens, settings.max_tokens - generated - 1)
            drafted, q, checkpoints = self._draft(unread, k, rule, history, fast)
            verify = mx.array(unread[-1:])
            if k:
                verify = mx.concatenate([verify, drafted.astype(verify.dtype)])
            logits = _forward(model, verify, cache)
            n, new = rule.accept(logits, drafted, q, history)
            stats.drafted_tokens += k
            stats.accepted_tokens += n
            read = 0
            try:
                for t in new:
                    read += 1
                    generated += 1
                    stats.generated_tokens = generated
                    stats.decode_seconds = time.perf_counter() - decode_start
                    yield t
                    history.append(t)
            finally:  # also when the caller stops reading mid-way (GeneratorExit)
                kept = min(read, n)  # drafted tokens kept: read by the caller and accepted
                rewind(cache, k - kept)
                if k:
                    Checkpoint.restore_for(checkpoints, kept, self.cache)
            drafted_read = min(n, k - 1) if k else 0
            unread = new[drafted_read:] if k else unread + new
            if generated % 256 < len(new):
                mx.clear_cache()

    def _draft(self, unread: list[int], k: int, rule: Rule, history: list[int],
               fast: Any) -> tuple[mx.array | None, mx.array | None, list[Checkpoint]]:
        """Read the unread tokens and propose k: returns the drafted ids [k], their
        distributions [k, vocab] (None when greedy) and a checkpoint before each draft the
        draft model read (k - 1 of them)."""
        if k == 0:
            return None, None, []
        ids = mx.array(self.readable(unread))
        tokens, dists, checkpoints = [], [], []
        pending = history[-HISTORY:]  # the processors' view: history, then drafts
        for j in range(k):
            if j:
                checkpoints.append(Checkpoint.of(self.cache))
            logits = self._read(ids, fast)
            token, dist = rule.draw(logits, pending)
            mx.async_eval(token)
            tokens.append(token)
            dists.append(dist)
            pending = pending + [token]
            ids = token.astype(mx.int32).reshape(1)
        drafted = mx.concatenate([t.reshape(1) for t in tokens])
        q = mx.stack(dists) if dists[0] is not None else None
        return drafted, q, checkpoints

    def _read(self, ids: mx.array, fast: Any) -> mx.array:
        """Feed ids [L] to the draft; the logits [vocab] after the last one."""
        if fast is not None and ids.shape[0] == 1:
            fast.prepare(self.cache)
            return fast.step(ids, self.cache)
        return _forward(self.model, ids, self.cache, last=True)


def _forward(model: Model, ids: mx.array, cache: list, last: bool = False) -> mx.array:
    """Logits [L, vocab] (or [vocab] of the last) of text ids [L] read into the cache, token
    after token as plain decoding reads them: no image block masks (generated ids are text),
    and no host sync to look for image tokens."""
    decoder = model.net.decoder
    h = decoder(decoder.embed(ids[None]), cache)
    return model.net.logits(h[:, -1, :] if last else h)[0]


# ---- rolling back ------------------------------------------------------------------------------

def rewind(cache: list, n: int) -> None:
    """Drop the last n tokens from caches whose last update read them in one multi-token pass
    (rotating caches then hold the window in temporal order; see the module docstring)."""
    if n <= 0:
        return
    for c in cache:
        if isinstance(c, RotatingKVCache):
            if c._idx != c.keys.shape[2] or c._idx - n < min(c.offset - n, c.max_size):
                raise RuntimeError("rewind needs a rotating cache in temporal order, as a "
                                   "multi-token pass leaves it")
            c.offset -= n
            c._idx -= n
            c.keys, c.values = c.keys[..., :c._idx, :], c.values[..., :c._idx, :]
        else:
            c.trim(n)


@dataclass
class Checkpoint:
    """A cache's state before a one-token step: the offsets, and the sliding layers' arrays."""

    offsets: list[int]
    rings: dict[int, tuple]

    @classmethod
    def of(cls, cache: list) -> Checkpoint:
        # New array objects over the same buffers: mlx-lm's one-token update writes into its
        # arrays in place (Python-side), which must not reach the snapshot.
        rings = {i: (c.keys[...], c.values[...], c.offset, c._idx)
                 for i, c in enumerate(cache) if isinstance(c, RotatingKVCache)}
        return cls([c.offset for c in cache], rings)

    def restore(self, cache: list) -> None:
        for i, c in enumerate(cache):
            if i in self.rings:
                c.keys, c.values, c.offset, c._idx = self.rings[i]
            else:
                c.trim(c.offset - self.offsets[i])

    @staticmethod
    def restore_for(checkpoints: list[Checkpoint], kept: int, cache: list) -> None:
        """After drafting, keep the first `kept` drafted tokens the draft read (it read all
        but the last): checkpoint j was taken before it read drafted token j + 1."""
        if kept < len(checkpoints):
            checkpoints[kept].restore(cache)


# ---- sampling and the acceptance rule ------------------------------------------------------------

class Rule:
    """The sampling settings as distributions, for both models, and the acceptance rule."""

    def __init__(self, settings: SamplingSettings, vocab: int | None = None):
        self.vocab = vocab  # the target's: a draft with more ids never proposes the extra ones
        self.greedy = settings.temp == 0
        self.temp = settings.temp
        self.processors = make_logits_processors(repetition_penalty=settings.repetition_penalty)
        self.settings = settings
        self.sampler = make_sampler(settings.temp, settings.top_p, settings.min_p,
                                    settings.top_k)
        self.keys = SeedKeys(settings.seed)  # as the plain engine draws

    def logprobs(self, logits: mx.array, history: Sequence) -> mx.array:
        """Processed, normalised logits [vocab] after `history`: ints, then token arrays."""
        if self.processors:
            tokens = _history_array(history)
            for processor in self.processors:
                logits = processor(tokens, logits[None])[0]
        return logits - mx.logsumexp(logits)

    def sample(self, logprobs: mx.array) -> mx.array:
        """One token [1], exactly as the plain engine samples it."""
        return self.sampler(logprobs[None], None if self.greedy else self.keys.next())

    def distribution(self, logprobs: mx.array) -> mx.array:
        """The sampler's distribution [..., vocab] (float32)."""
        s = self.settings
        return distribution(logprobs, s.temp, s.top_p, s.min_p, s.top_k)

    def draw(self, logits: mx.array, history: Sequence) -> tuple[mx.array, mx.array | None]:
        """The draft's token [] and its distribution q [vocab] (None when greedy)."""
        logits = logits[:self.vocab]
        if self.greedy:
            return mx.argmax(self.logprobs(logits, history) if self.processors else logits), None
        q = self.distribution(self.logprobs(logits, history)[None])[0]
        return mx.random.categorical(mx.log(q), key=self.keys.next()), q

    def accept(self, logits: mx.array, drafted: mx.array | None, q: mx.array | None,
               history: list[int]) -> tuple[int, list[int]]:
        """The target's logits [k + 1, vocab] after the last token and after each of the k
        drafts: returns how many drafts it accepts (n) and the tokens it emits: those n drafts
        and one of its own."""
        k = logits.shape[0] - 1
        if self.processors:
            logprobs = mx.stack([self.logprobs(logits[i], [*history[-HISTORY:],
                                                           *(drafted[j] for j in range(i))])
                                 for i in range(k + 1)])
        else:
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.greedy:
            own = mx.argmax(logprobs, axis=-1)
            mx.eval(own, *([drafted] if k else []))
            return _agree([t == d for t, d in zip(own.tolist(), _ids(drafted), strict=False)],
                          _ids(drafted), own.tolist())
        p = self.distribution(logprobs)
        bonus = mx.random.categorical(mx.log(p[k]), key=self.keys.next())
        if k == 0:
            return 0, [bonus.item()]
        if q.shape[-1] < p.shape[-1]:  # a draft without the target's extra (image) ids
            q = mx.pad(q, [(0, 0), (0, p.shape[-1] - q.shape[-1])])
        p_x = mx.take_along_axis(p[:k], drafted[:, None], axis=-1)[:, 0]
        q_x = mx.take_along_axis(q, drafted[:, None], axis=-1)[:, 0]
        accepted = mx.random.uniform(shape=(k,), key=self.keys.next()) * q_x < p_x  # p(min(1, p/q))
        residual = mx.maximum(p[:k] - q, 0.0)
        # Where p == q a draft is always accepted and the residual is never used.
        residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p[:k])
        fix = mx.random.categorical(mx.log(residual), key=self.keys.next())
        mx.eval(accepted, fix, bonus, drafted)
        own = [*fix.tolist(), bonus.item()]
        return _agree(accepted.tolist(), _ids(drafted), own)


HISTORY = 1024  # tokens of history the logits processors see (mlx-lm's look at the last 20)


def _agree(accepted: list[bool], drafted: list[int], own: list[int]) -> tuple[int, list[int]]:
    """The first n accepted drafts and the target's own token at n."""
    n = 0
    while n < len(drafted) and accepted[n]:
        n += 1
    return n, [*drafted[:n], own[n]]


def _ids(drafted: mx.array | None) -> list[int]:
    return drafted.tolist() if drafted is not None else []


def _history_array(history: Sequence) -> mx.array:
    ints = [t for t in history if isinstance(t, int)]
    arrays = [t.reshape(1).astype(mx.uint32) for t in history if not isinstance(t, int)]
    head = mx.array(ints, dtype=mx.uint32)
    return mx.concatenate([head, *arrays]) if arrays else head
