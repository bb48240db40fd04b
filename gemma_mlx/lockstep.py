"""Rank 0 takes the requests; the other ranks of a distributed run follow it step by step.

Under `mlx.launch`, only rank 0 reads the prompt (the CLI's stdin, a server's HTTP); the other
ranks must still run every forward pass with it, collective for collective. So rank 0's
model carries a `Leader` (`model.leader`, set by `Leader.attach`), and the engine hands it
each generation (`engine.stream_tokens`). Before the generation starts, the leader broadcasts a
`Request`: the prompt ids, the sampling settings, which of its KV caches it uses and how
many tokens that cache keeps, the soft tokens of its images. Each other rank runs `follow`:
it receives the request, mirrors the cache, and runs the same `generate_tokens`. Then, for
every token rank 0 pulls, one flag goes out ("one more"), and a last one ("done") when rank
0 stops pulling, whatever stopped it: a stop token, max_tokens, `should_stop`, a consumer
that stopped reading. A prefill's `should_stop` between chunks is shared the same way.
Tokens are rank 0's on every rank (`Model.agree`), so all ranks hold the same caches.

For a server, in the thread that owns MLX on rank 0:

    with lockstep.leading(model.sharding.group) as leader:
        leader.attach(model)   # each generation through Session.stream / stream_tokens is
        ...serve...            # followed by the other ranks; leaving ends their `follow`

and on every other rank: `lockstep.follow(model)` (returns when rank 0 leaves `leading`).
Rank 0 may enter `leading` before it loads the model (`leader.attach(model)` after): if it
fails first, the other ranks load theirs and stop following at once.
Requests must run one at a time through `stream_tokens` (a Session): continuous batching
and speculative decoding are not followed.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import QuantizedKVCache

from .distributed import LayerElsewhere, broadcast
from .engine import PrefillStopped, SamplingSettings, Stats, cache_offset, generate_tokens
from .loading import Model
from .session import trim
from .watchdog import lost_rank


@dataclass
class Request:
    """One generation as rank 0 runs it: what the other ranks need to run the same steps."""

    ids: list[int]  # the prompt ids after those the cache holds
    settings: dict  # SamplingSettings, as a dict (max_tokens already fitted to the context)
    slot: int  # which of rank 0's KV caches (the other ranks keep a mirror of each)
    keep: int  # tokens that cache keeps from before (rank 0 trimmed it to that many)
    kv_bits: int | None = None  # how a new cache stores its global layers
    constrained: bool = False  # a grammar masks rank 0's logits: its loop runs one step ahead
    images: list[int] | None = None  # the shape of the image features that follow, if any
    images_dtype: str | None = None  # ... and their dtype
    dropped: list[int] = field(default_factory=list)  # slots rank 0 no longer has

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> Request:
        return cls(**json.loads(data))


class Unconstrained:
    """A follower's stand-in for rank 0's grammar: the same loop, no mask (the tokens are
    rank 0's anyway)."""

    seconds = 0.0

    def advance(self, token: int) -> None:
        pass

    def mask(self) -> None:
        return None


# ---- the wire: rank 0's bytes, flags and arrays ---------------------------------------------

Send = Callable[[mx.array], mx.array]  # rank 0's array on every rank (distributed.broadcast)


def share_bytes(send: Send, data: bytes | None) -> bytes:
    """Rank 0's `data` on every rank (the others pass None); empty means done."""
    length = send(mx.array([len(data or b"")], mx.int32)).item()
    if length == 0:
        return b""
    payload = np.frombuffer(data, np.uint8) if data else np.zeros(length, np.uint8)
    return bytes(np.array(send(mx.array(payload))))


def share_flag(send: Send, value: bool = False) -> bool:
    """Rank 0's `value` on every rank."""
    return bool(send(mx.array([int(value)], mx.int32)).item())


# ---- rank 0 ---------------------------------------------------------------------------------

class Leader:
    """Rank 0's side: announces each generation and paces the others through it."""

    def __init__(self, group: Any):
        self.send: Send = lambda x: broadcast(x, group)
        self.model: Model | None = None
        self.finished = False
        self._slots: dict[int, int] = {}  # id of a cache's first layer -> its slot
        self._next_slot = 0
        self._dropped: list[int] = []

    def attach(self, model: Model) -> None:
        """Lead with this (distributed) model: its generations are announced from now on."""
        self.model = model
        self.send = model.sharding.broadcast  # after the model's steps in flight
        model.leader = self
        model.net.share_images = False  # rank 0 encodes alone; the features go with requests

    def generate_tokens(self, prompt: Sequence[int], cache: list, settings: SamplingSettings,
                        stats: Stats, should_stop: Callable[[], bool] | None = None,
                        image_features: mx.array | None = None, constraint: Any = None,
                        **options: Any) -> Iterator[int]:
        """`engine.generate_tokens`, announced to the other ranks and paced for them."""
        self.announce(prompt, cache, settings, image_features, constraint is not None)
        stop = should_stop or (lambda: False)
        tokens = generate_tokens(self.model, prompt, cache, settings, stats,
                                 image_features=image_features,
                                 should_stop=lambda: share_flag(self.send, stop()),
                                 constraint=constraint, **options)
        return self._paced(tokens)

    def announce(self, prompt: Sequence[int], cache: list, settings: SamplingSettings,
                 image_features: mx.array | None, constrained: bool) -> None:
        slot, new = self._slot(cache)
        keep = cache_offset(cache)
        if new and keep:
            raise ValueError("this KV cache was filled before rank 0 led: the other ranks "
                             "cannot mirror it (make caches while leading)")
        images = image_features is not None
        request = Request(list(prompt), asdict(settings), slot, keep, _kv_bits(cache),
                          constrained, list(image_features.shape) if images else None,
                          str(image_features.dtype).split(".")[-1] if images else None,
                          self._dropped)
        self._dropped = []
        share_bytes(self.send, request.encode())
        if image_features is not None:
            mx.eval(self.send(image_features))

    def finish(self) -> None:
        """Tell the other ranks to stop following (once), and lead no more."""
        if not self.finished:
            self.finished = True
            share_bytes(self.send, None)
        if self.model is not None:
            self.model.leader = None
            self.model.net.share_images = True

    def _slot(self, cache: list) -> tuple[int, bool]:
        key = id(cache[0])
        if key in self._slots:
            return self._slots[key], False
        slot = self._slots[key] = self._next_slot
        self._next_slot += 1
        weakref.finalize(cache[0], self._forget, key, slot)
        return slot, True

    def _forget(self, key: int, slot: int) -> None:
        if self._slots.get(key) == slot:
            del self._slots[key]
        self._dropped.append(slot)

    def _paced(self, tokens: Iterator[int]) -> Iterator[int]:
        """Before each token is pulled, "one more" to the other ranks; "done" once no more
        will be, unless the run itself broke (then the others stop on the lost collectives)."""
        clean = True
        try:
            while True:
                share_flag(self.send, True)
                try:
                    token = next(tokens)
                except StopIteration:
                    return
                yield token
        except (GeneratorExit, PrefillStopped):
            raise
        except BaseException:
            clean = False
            raise
        finally:
            tokens.close()
            if clean:
                share_flag(self.send, False)


def _kv_bits(cache: list) -> int | None:
    for c in cache:
        if isinstance(c, QuantizedKVCache):
            return c.bits
        if isinstance(c, LayerElsewhere) and c.bits is not None:
            return c.bits
    return None


@contextmanager
def leading(group: Any) -> Iterator[Leader | None]:
    """Rank 0 of the group leads while the block runs (`Leader.attach` a model to it); on
    leaving, the other ranks stop following, unless a rank was lost. Yields None where there
    is nothing to lead (no group, or another rank)."""
    if group is None or group.rank() != 0:
        yield None
        return
    leader = Leader(group)
    try:
        yield leader
    except BaseException as e:
        if lost_rank(e) is None:
            try:
                leader.finish()
            except RuntimeError as lost:  # the others failed too (the same error, likely)
                if lost_rank(lost) is None:
                    raise
        raise
    leader.finish()


# ---- the other ranks ------------------------------------------------------------------------

def follow(model: Model) -> int:
    """Run every generation rank 0 leads, until it stops leading; returns how many ran."""
    send = model.sharding.broadcast
    caches: dict[int, list] = {}
    count = 0
    while data := share_bytes(send, None):
        request = Request.decode(data)
        for slot in request.dropped:
            caches.pop(slot, None)
        cache = _mirror(model, caches, request)
        features = None
        if request.images is not None:
            features = send(mx.zeros(request.images, getattr(mx, request.images_dtype)))
            mx.eval(features)
        tokens = generate_tokens(model, request.ids, cache, SamplingSettings(**request.settings),
                                 Stats(), image_features=features,
                                 should_stop=lambda: share_flag(send),
                                 constraint=Unconstrained() if request.constrained else None)
        with closing(tokens):
            while share_flag(send):
                try:
                    next(tokens, None)
                except PrefillStopped:
                    pass
        count += 1
    return count


def _mirror(model: Model, caches: dict[int, list], request: Request) -> list:
    """This rank's copy of rank 0's cache for the request: new, or trimmed as rank 0's was."""
    cache = caches.get(request.slot)
    if cache is None:
        cache = caches[request.slot] = model.make_cache(request.kv_bits)
    if not trim(cache, cache_offset(cache) - request.keep) or cache_offset(cache) != request.keep:
        raise RuntimeError(f"cache slot {request.slot} cannot follow rank 0's (it holds "
                           f"{cache_offset(cache)} tokens, rank 0's {request.keep})")
    return cache
