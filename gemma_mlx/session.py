"""A session: one KV cache and what it holds, reused from one prompt to the next.

A session remembers the token ids its cache has read and the pictures of their image blocks.
A new prompt keeps the longest cached prefix (the same ids, and the same pictures in the same
image blocks: every image block has the same ids), trims the rest where the caches allow it, or
starts a fresh cache where they cannot (a sliding-window ring that has wrapped has lost its old
keys), and prefills only what is new. After a reply the cache holds the prompt and the tokens it
read, so the next prompt that extends the conversation starts where this one ended.

`Chat` is a conversation plus one session; the server keeps a pool of them. Image features are
kept by content (`FeatureCache`, which sessions may share), so a picture is encoded once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from .engine import Chunk, SamplingSettings, cache_offset, stream_tokens
from .errors import BadRequest
from .images import preprocess
from .loading import Model, check_kv_bits
from .prompt import Picture, Prompt
from .speculative import DEFAULT_NUM_DRAFT_TOKENS, Draft, check_draft, check_num_draft_tokens

FEATURE_CACHE_SIZE = 32  # images whose vision features are kept (about 5 MB each on 4B)


class FeatureCache:
    """Soft tokens of pictures by content key, the least recently used dropped first."""

    def __init__(self, model: Model, size: int | None = None):
        self.model = model
        self.size = size or FEATURE_CACHE_SIZE
        self._features: OrderedDict[str, mx.array] = OrderedDict()
        self.encoded = 0  # pictures run through the vision tower, for tests and metrics

    def __contains__(self, key: str) -> bool:
        return key in self._features

    def __len__(self) -> int:
        return len(self._features)

    def features(self, pictures: Sequence[Picture]) -> mx.array | None:
        """[n_blocks, tokens per image, hidden] for these pictures, encoding only the new ones
        (in one batch through the vision tower)."""
        if not pictures:
            return None
        size = self.model.config.vision.image_size
        missing = list({p.key: p.image for p in pictures if p.key not in self._features}.items())
        if missing:
            pixels = mx.array(np.stack([preprocess(image, size) for _, image in missing]))
            encoded = self.model.net.encode_images(pixels)
            mx.eval(encoded)
            self.encoded += len(missing)
            for (key, _), features in zip(missing, encoded, strict=True):
                self._features[key] = features
        stacked = mx.stack([self._features[p.key] for p in pictures])
        for p in pictures:  # the least recently used go first, never this prompt's
            self._features.move_to_end(p.key)
        while len(self._features) > self.size:
            self._features.popitem(last=False)
        return stacked


class Session:
    """A KV cache, the ids and pictures it holds, and (with a draft model) the draft's cache.

        session = Session(model)
        for chunk in session.stream(prompt, SamplingSettings(temp=0)):
            print(chunk.text, end="")
        session.cached_tokens  # of that prompt, read from the cache instead of prefilled
    """

    def __init__(self, model: Model, kv_bits: int | None = None,
                 draft_model: Model | None = None,
                 num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
                 features: FeatureCache | None = None):
        check_kv_bits(kv_bits)
        if draft_model is not None:
            check_draft(model, draft_model)
        check_num_draft_tokens(num_draft_tokens)
        self.model = model
        self.kv_bits = kv_bits
        self.draft_model = draft_model
        self.num_draft_tokens = num_draft_tokens
        self.features = features or FeatureCache(model)
        self.busy = False  # one generation at a time: the cache belongs to it
        self.cache: list | None = None
        self.ids: list[int] = []  # what the cache has read
        self.pictures: list[str] = []  # content keys of its image blocks, in order
        self.draft_cache: list | None = None  # the draft model's cache, and the ids it holds
        self.draft_ids: list[int] = []
        self.cached_tokens = 0  # of the last prompt: reused from the cache
        self.prefilled_tokens = 0  # ... and prefilled

    def reset(self) -> None:
        """Forget everything cached (the next prompt is prefilled whole)."""
        self.cache, self.ids, self.pictures = None, [], []
        self.draft_cache, self.draft_ids = None, []

    @property
    def nbytes(self) -> int:
        """Memory of the KV caches (the model's and the draft's)."""
        caches = [c for c in (self.cache, self.draft_cache) if c is not None]
        return sum(a.nbytes for cache in caches for layer in cache
                   for _, a in tree_flatten(layer.state) if isinstance(a, mx.array))

    def common_prefix(self, prompt: Prompt) -> int:
        """How many leading ids of `prompt` this session holds, with the same pictures in each
        image block it passes (compared by content key at each `<start_of_image>`)."""
        boi = self.model.config.boi_token_index
        keys = [p.key for p in prompt.pictures]
        common = block = 0
        for a, b in zip(self.ids, prompt.ids, strict=False):
            if a != b:
                break
            if b == boi:
                if self.pictures[block:block + 1] != keys[block:block + 1]:
                    break  # another picture in the same place: prefill from its block on
                block += 1
            common += 1
        return common

    def stream(self, prompt: Prompt, settings: SamplingSettings,
               should_stop: Callable[[], bool] = lambda: False,
               context_limit: int | None = None, **engine: Any) -> Iterator[Chunk]:
        """Generate from the prompt, prefilling only what the cache does not hold. When the
        caller stops reading (or `should_stop`), the cache keeps the prompt and the tokens read;
        after an error mid-step it is dropped (rebuilt by the next prompt). `engine` options go
        to `stream_tokens` (logprobs, ...); a draft model drafts only without them."""
        if self.busy:
            raise BadRequest("a reply is still streaming: read it to the end or close it "
                             "before the next turn")
        new_ids, features = self.prepare(prompt)
        draft = None if engine.get("logprobs") else self._draft(prompt.ids)
        tokens: list[int] = []
        stop_token = None
        self.busy = True
        chunks = stream_tokens(self.model, new_ids, settings, cache=self.cache,
                               should_stop=should_stop, image_features=features,
                               context_limit=context_limit, draft=draft, **engine)
        try:
            for chunk in chunks:
                tokens = chunk.tokens
                if chunk.finish_reason == "stop":
                    stop_token = chunk.token
                yield chunk
        except GeneratorExit:  # the caller stopped reading: a clean stop between tokens
            chunks.close()  # first: a draft then rolls the caches back to the tokens read
            self.record(prompt.ids, tokens, None)
            raise
        except BaseException:
            self.reset()  # a half-run step: rebuild next time
            raise
        finally:
            self.busy = False
        self.record(prompt.ids, tokens, stop_token)

    def prepare(self, prompt: Prompt) -> tuple[list[int], mx.array | None]:
        """Make the cache hold the longest prefix of the prompt it can; return the ids still to
        prefill and the soft tokens of the images among them (for `stream`, or a batch)."""
        reuse = self._reuse(prompt)
        blocks = sum(1 for t in prompt.ids[:reuse] if t == self.model.config.boi_token_index)
        features = self.features.features(prompt.pictures[blocks:])
        self.cached_tokens, self.prefilled_tokens = reuse, len(prompt.ids) - reuse
        return prompt.ids[reuse:], features

    def record(self, ids: list[int], tokens: list[int], stop_token: int | None) -> None:
        """What the caches hold after a reply: the prompt, then the tokens they read."""
        fed = ids + tokens + ([stop_token] if stop_token is not None else [])
        self.ids = fed[:cache_offset(self.cache)]
        if self.draft_cache is not None:
            self.draft_ids = fed[:cache_offset(self.draft_cache)]

    def _reuse(self, prompt: Prompt) -> int:
        """Trim the cache to the longest prefix it shares with the prompt (at least one token
        must be new), or start afresh where it cannot be trimmed. Returns the prefix length."""
        if self.cache is None:
            self.cache, self.ids = self.model.make_cache(self.kv_bits), []
        common = min(self.common_prefix(prompt), len(prompt.ids) - 1)
        if not trim(self.cache, len(self.ids) - common):
            self.cache, common = self.model.make_cache(self.kv_bits), 0
        self.ids, self.pictures = prompt.ids[:common], [p.key for p in prompt.pictures]
        return common

    def _draft(self, ids: list[int]) -> Draft | None:
        """The draft model's part of this prompt: its cache, trimmed to the longest prefix of
        `ids` it holds (or fresh where it cannot be trimmed), and the ids it has yet to read.
        It sees no pictures, so the ids are all there is to compare."""
        if self.draft_model is None:
            return None
        if self.draft_cache is None:
            self.draft_cache, self.draft_ids = self.draft_model.make_cache(), []
        common = 0
        for a, b in zip(self.draft_ids, ids, strict=False):
            if a != b:
                break
            common += 1
        if not trim(self.draft_cache, len(self.draft_ids) - common):
            self.draft_cache, common = self.draft_model.make_cache(), 0
        self.draft_ids = ids[:common]
        return Draft(self.draft_model, self.draft_cache, ids[common:], self.num_draft_tokens)


def trim(cache: list, excess: int) -> bool:
    """Drop the cache's last `excess` tokens; False where it cannot (a rotating cache that has
    wrapped: its old keys are gone), and the caller starts a fresh cache instead."""
    if excess <= 0:
        return True
    if not can_trim_prompt_cache(cache):
        return False
    trim_prompt_cache(cache, excess)
    return True
