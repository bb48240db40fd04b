"""Continuous batching: many streams decoded together, each token step one compiled graph.

One stream reads every weight once per token; B streams decoded together read them once for
all B, so on a machine whose decode is bound by memory bandwidth, batching is nearly free
throughput. A `Batch` holds up to `max_batch` streams:

- a newcomer's prompt is prefilled on its own session's cache (the prefix it shares with a
  cached conversation is not prefilled again), one chunk per step, interleaved with the
  running streams' decode steps, so a long prompt arriving does not freeze them;
- its cache, laid out as the compiled step reads it, is then copied into a free row of the
  batch's buffers ([rows, kv heads, slots, head dim] per layer: a ring of `sliding_window`
  slots on sliding layers, the context so far on global ones), and each step feeds every row
  its own token at its own offset (model/decode.py, `CompiledDecode.step_rows`);
- a finished stream leaves at once: its row is copied back into its session's cache (so the
  server's prefix cache keeps it) and freed.

Each stream keeps its own sampling settings, seed (its own random key sequence, the one a solo
run with that seed draws from), logprobs, grammar constraint and stop decision. The rows grow
by doubling as streams arrive and shrink as they leave, so one stream runs at B = 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache
from mlx_lm.sample_utils import (
    make_logits_processors,
)

from .engine import (
    Chunk,
    Logprobs,
    SamplingSettings,
    Stats,
    add_token,
    prefill_chunks,
)
from .errors import BadRequest, ContextOverflow
from .loading import Model
from .model.decode import (
    DECODE_CAPACITY_STEP,
    _kv_arrays,
    _set_kv_arrays,
    decode_program,
)
from .prompt import Prompt
from .sampling import SeedKeys, make_sampler
from .session import Session

BATCH_PREFILL_CHUNK = 512  # tokens of a newcomer's prompt per step of the running streams


BATCH_MIN_CAPACITY = 128  # slots of the global layers of a young batch


def batch_capacity(needed: int) -> int:
    """Global-layer slots for a timeline of `needed`: doubling from BATCH_MIN_CAPACITY to
    DECODE_CAPACITY_STEP, then whole steps. Every row attends over all of them (masked), so
    short requests should not pay for 512: on a two-core CPU, 8 rows of a tiny model stepped in
    3.9 ms over 128 slots against 6.2 ms over 512. Each size is traced once per row count."""
    size = BATCH_MIN_CAPACITY
    while size < needed and size < DECODE_CAPACITY_STEP:
        size *= 2
    if needed <= size:
        return size
    return -(-needed // DECODE_CAPACITY_STEP) * DECODE_CAPACITY_STEP


class RowSampler:
    """One stream's sampling, as the engine's sampler does it (sampling.py), but with the
    stream's own random key when it has a seed: the key sequence `mx.random.seed` gives a solo
    run, so a seeded stream draws the same in a batch as alone."""

    def __init__(self, settings: SamplingSettings, prompt: Sequence[int]):
        self.temp = settings.temp
        self.keys = SeedKeys(settings.seed)
        self.processors = make_logits_processors(repetition_penalty=settings.repetition_penalty)
        self.history = mx.array(list(prompt)) if self.processors else None
        self.sample = make_sampler(settings.temp, settings.top_p, settings.min_p,
                                   settings.top_k)

    @property
    def plain_greedy(self) -> bool:
        return self.temp == 0 and not self.processors

    def __call__(self, logits: mx.array) -> mx.array:
        """A token [1] from one row's logits [vocab]."""
        logits = logits[None]
        for processor in self.processors:
            logits = processor(self.history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = self.sample(logprobs, self.keys.next() if self.temp != 0 else None)
        if self.processors:
            self.history = mx.concatenate([self.history, token])
        return token


@dataclass
class Stream:
    """One request in the batch: what it asks for and how far it got."""

    prompt: Prompt
    settings: SamplingSettings
    session: Session
    should_stop: Callable[[], bool] = lambda: False
    logprobs: int | None = None
    constraint: Any = None  # constrain.Constraint: this stream's grammar
    context_limit: int | None = None
    # ---- state ---------------------------------------------------------------------------
    stats: Stats = field(default_factory=Stats)
    tokens: list[int] = field(default_factory=list)
    row: int | None = None  # its row in the batch, once prefilled
    finished: str | None = None
    stop_token: int | None = None  # the one that ended it (its cache read it too)
    _pending: mx.array | None = None  # the last token sampled (its next step's input)
    _read_ahead: bool = False  # ... already read (the first token, read at once)
    _prefill: Iterator | None = None
    _started: float = 0.0
    _decode_start: float = 0.0

    def __post_init__(self) -> None:
        self.sampler = RowSampler(self.settings, self.prompt.ids)
        tokenizer = self.session.model.tokenizer  # None on a benchmark's random model: no text
        self.detok = tokenizer.detokenizer if tokenizer is not None else None
        self.recorder = Logprobs(self.logprobs) if self.logprobs is not None else None


class KVRows:
    """The batch's KV buffers, in the compiled step's layout but `rows` deep: global layers
    `capacity` slots, sliding layers a ring of `window` slots.

    All rows share one timeline: every step writes each row's token at slot `now` (in place,
    one write for all rows; a ring at now % window), and a row occupies slots start..now-1
    with its own positions 0..now-start-1. A newcomer of L tokens goes in at start = now - L;
    when the timeline is shorter than that, the others move along it first. The slots before
    the earliest start are dropped when the global layers run out of room."""

    def __init__(self, model: Model):
        self.cfg = model.config.text
        self.rows = 0
        self.capacity = 0
        self.now = 0  # the slot of the next write
        self.starts: list[int | None] = []  # per row: the slot of its first token, or free
        self.buffers: list[list[mx.array]] = []  # per layer: keys, values (or 3 + 3)
        self.quantized: list[tuple[int, int] | None] = []
        self._now_array, self._now_value = mx.array(0, dtype=mx.int32), 0
        self._starts_array, self._starts_key = mx.array([], dtype=mx.int32), []

    def timeline(self) -> tuple[mx.array, mx.array]:
        """`now` and the rows' starts as the step takes them, on the device: uploaded only
        when they changed (a step advances `now` there, see `advanced`), not every step. A
        free row starts at the `now` of the upload: any start up to `now` serves, its outputs
        are ignored."""
        if self._now_value != self.now:
            self._now_array, self._now_value = mx.array(self.now, dtype=mx.int32), self.now
        if self._starts_key != self.starts:
            self._starts_array = mx.array([s if s is not None else self.now
                                           for s in self.starts], dtype=mx.int32)
            self._starts_key = list(self.starts)
        return self._now_array, self._starts_array

    def advanced(self, now: mx.array) -> None:
        """A step wrote slot `now`; `now` is the next one, as the step computed it."""
        self.now += 1
        self._now_array, self._now_value = now, self.now

    def _sliding(self, i: int) -> bool:
        return self.cfg.is_sliding(i)

    def put(self, row: int, cache: list, length: int) -> None:
        """Copy a prepared cache of `length` tokens (one row, the compiled layout) into the
        free `row`."""
        arrays = [_kv_arrays(c) for c in cache]
        if not self.buffers:
            self.quantized = [(c.group_size, c.bits) if isinstance(c, QuantizedKVCache) else None
                              for c in cache]
            self.buffers = [[mx.zeros((self.rows, *a.shape[1:2], 0 if not self._sliding(i)
                                       else a.shape[2], a.shape[3]), a.dtype) for a in layer]
                            for i, layer in enumerate(arrays)]
            self.now = length
        if length > self.now:
            self._shift(length - self.now)
        self.room()
        start = self.now - length
        for i, layer in enumerate(arrays):
            for j, a in enumerate(layer):
                buffer = self.buffers[i][j]
                if self._sliding(i):  # position p at slot (start + p) % window
                    buffer[row:row + 1] = mx.roll(a, start % a.shape[2], axis=2)
                else:
                    buffer[row:row + 1, :, start:self.now] = a[:, :, :length]
                self.buffers[i][j] = buffer
        for c in cache:  # the row holds them now; `take` gives them back
            _set_kv_arrays(c, [None] * len(_kv_arrays(c)))
        self.starts[row] = start

    def length(self, row: int) -> int:
        return self.now - self.starts[row]

    def take(self, row: int, cache: list) -> None:
        """Copy `row` back into a cache's objects, in the single-stream layout (position p at
        slot p, or p % window on a ring), and free it."""
        start = self.starts[row]
        length = self.now - start
        for i, (c, layer) in enumerate(zip(cache, self.buffers, strict=True)):
            if self._sliding(i):
                # A copy (roll makes one): a view would keep the batch's buffers from being
                # updated in place (every later step would copy them whole).
                arrays = [mx.roll(a[row:row + 1], -(start % a.shape[2]), axis=2) for a in layer]
            else:
                arrays = [a[row:row + 1, :, start:self.now] * 1 for a in layer]
            _set_kv_arrays(c, arrays)
            c.offset = length
            if isinstance(c, RotatingKVCache):
                c._idx = length % c.max_size if length >= c.max_size else length
        mx.eval([_kv_arrays(c) for c in cache])
        self.starts[row] = None

    def room(self) -> None:
        """Make the global layers hold slot `now`: drop the slots before the earliest start,
        then grow (batch_capacity)."""
        if self.now < self.capacity:
            return
        used = [s for s in self.starts if s is not None]
        if used and min(used) > 0:
            self._shift(-min(used))
        needed = self.now + 1
        if needed <= self.capacity:
            return
        size = batch_capacity(needed)
        for i, layer in enumerate(self.buffers):
            if not self._sliding(i):
                self.buffers[i] = [mx.concatenate([a, mx.zeros(
                    (a.shape[0], a.shape[1], size - a.shape[2], a.shape[3]), a.dtype)], axis=2)
                    for a in layer]
        self.capacity = size

    def _shift(self, delta: int) -> None:
        """Move every row `delta` slots along the timeline (left when negative): a copy of the
        buffers, only when a longer newcomer arrives or the global layers are full."""
        if delta == 0:
            return
        for i, layer in enumerate(self.buffers):
            if self._sliding(i):
                self.buffers[i] = [mx.roll(a, delta, axis=2) for a in layer]
            elif delta > 0:
                self.buffers[i] = [mx.concatenate([mx.zeros(
                    (a.shape[0], a.shape[1], delta, a.shape[3]), a.dtype), a], axis=2)
                    for a in layer]
            else:
                self.buffers[i] = [a[:, :, -delta:] for a in layer]
        if self.buffers:
            global_layer = next((layer for i, layer in enumerate(self.buffers)
                                 if not self._sliding(i)), None)
            self.capacity = global_layer[0].shape[2] if global_layer else 0
        self.now += delta
        self.starts = [s + delta if s is not None else None for s in self.starts]

    def resize(self, keep: list[int | None], rows: int) -> None:
        """`rows` rows, new row r holding old row keep[r] (None: empty)."""
        if self.buffers:
            self.buffers = [[_gather_rows(a, keep, rows) for a in layer]
                            for layer in self.buffers]
        self.starts = [self.starts[r] if r is not None else None for r in keep]
        self.starts += [None] * (rows - len(keep))
        self.rows = rows

    def clear(self) -> None:
        self.buffers, self.rows, self.capacity, self.now, self.starts = [], 0, 0, 0, []

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for layer in self.buffers for a in layer)


def _gather_rows(a: mx.array, keep: list[int | None], rows: int) -> mx.array:
    parts = [a[r:r + 1] if r is not None else mx.zeros((1, *a.shape[1:]), a.dtype)
             for r in keep]
    parts += [mx.zeros((1, *a.shape[1:]), a.dtype)] * (rows - len(keep))
    return mx.concatenate(parts, axis=0)


class Batch:
    """Streams decoded together. `add` a stream, then call `step` until `idle`; each step
    returns the chunks it produced, (stream, Chunk) pairs, a stream's last with its
    finish_reason, exactly as `engine.stream_tokens` yields them."""

    def __init__(self, model: Model, max_batch: int = 8, prefill_chunk: int | None = None,
                 stop_ids: set[int] | None = None, dense_weights: bool = False):
        """`stop_ids`: the tokens that end a reply (the model's <eos> and <end_of_turn> unless
        given; benchmarks give none, so every stream runs its length). `dense_weights`: steps
        of several rows run over dense copies of the quantized weights (more memory; faster
        where a quantized matmul's cost grows with its rows, as on an H200; see
        `CompiledDecode.densified`)."""
        if max_batch < 1:
            raise BadRequest(f"the batch must hold at least one stream (got {max_batch})")
        self.model = model
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk or BATCH_PREFILL_CHUNK
        self.program = decode_program(model.net.decoder)
        self.dense = decode_program(model.net.decoder, dense=True) if dense_weights else None
        self.kv = KVRows(model)
        self.rows: list[Stream | None] = []  # by row
        self.prefilling: list[Stream] = []  # in arrival order; the first one advances
        self.stop_ids = set(model.config.eos_token_ids) if stop_ids is None else stop_ids
        self.steps = 0
        self.longest_gap = 0.0  # seconds between two steps of the running streams
        self._last_step = None
        # The last step's greedy tokens [rows], when every row took its argmax: the next
        # step's input as it is, with the row layout it was sampled for (see _sample).
        self._next: tuple[mx.array, tuple[Stream | None, ...]] | None = None
        self._input: mx.array | None = None  # that vector, when a step took it as its input

    @property
    def idle(self) -> bool:
        return not self.prefilling and not any(self.rows)

    @property
    def streams(self) -> int:
        return len(self.prefilling) + sum(1 for s in self.rows if s is not None)

    @property
    def full(self) -> bool:
        return self.streams >= self.max_batch

    def add(self, stream: Stream) -> None:
        """Admit a stream: its prompt is checked and its session prepared now (an error here
        leaves the batch as it was); its prefill runs during the next steps."""
        stream.settings.validate()
        if stream.session.busy:
            raise BadRequest("this session is already generating")
        limit = stream.context_limit or self.model.context_limit
        if len(stream.prompt.ids) >= limit:
            raise ContextOverflow(f"the prompt is {len(stream.prompt.ids)} tokens but the "
                                  f"context window holds {limit}: shorten the prompt")
        stream.settings = replace(stream.settings, max_tokens=min(
            stream.settings.max_tokens, limit - len(stream.prompt.ids)))
        stream._started = time.perf_counter()
        new_ids, features = stream.session.prepare(stream.prompt)
        stream.session.busy = True
        stream.stats.prompt_tokens = len(new_ids)
        stream._prefill = prefill_chunks(self.model, new_ids, stream.session.cache,
                                         self.prefill_chunk, features)
        self.prefilling.append(stream)

    def step(self) -> list[tuple[Stream, Chunk]]:
        """One decode step of every running stream, and one prefill chunk of a newcomer."""
        out: list[tuple[Stream, Chunk]] = []
        running = [s for s in self.rows if s is not None]
        logits = self._forward(running) if running else None
        if self.prefilling:
            self._advance_prefill(out)
        unread = [s for s in running if not s._read_ahead]
        for s in running:
            s._read_ahead = False
        if unread:
            for stream, token in zip(unread, self._sampled(unread), strict=True):
                self._read(stream, token, out)
        live = [s for s in running if s.finished is None]
        if logits is not None and live:
            self._sample(live, logits)
        for stream in running:
            if stream.finished is not None:
                self._leave(stream)
        self._shrink()
        now = time.perf_counter()
        if running and self._last_step is not None:
            self.longest_gap = max(self.longest_gap, now - self._last_step)
        self._last_step = now if any(self.rows) else None
        self.steps += 1
        return out

    def close(self) -> None:
        """Cancel everything (the streams' sessions keep what their caches read)."""
        for stream in [*self.prefilling, *[s for s in self.rows if s is not None]]:
            stream.finished = stream.finished or "cancelled"
            if stream.row is not None:
                self._leave(stream)
            else:
                stream.session.reset()
                stream.session.busy = False
        self.prefilling.clear()
        self.kv.clear()
        self.rows = []

    # ---- the steps ------------------------------------------------------------------------

    def _forward(self, running: list[Stream]) -> mx.array:
        """Queue the batched step: each row's pending token, at the timeline's slot."""
        kv = self.kv
        kv.room()
        if self._next is not None and self._same_rows(self._next[1]):
            tokens = self._input = self._next[0]
        else:
            self._input = None
            parts = [mx.zeros((1,), mx.uint32)] * kv.rows
            for s in running:
                parts[s.row] = s._pending.astype(mx.uint32)
            tokens = mx.concatenate(parts)
        now, starts = kv.timeline()
        program = self.dense if self.dense is not None and kv.rows > 1 else self.program
        program.set_quantized(kv.quantized)
        buffers = [a for layer in kv.buffers for a in layer]
        kv.buffers = []
        logits, new, next_now = program.step_rows(tokens, now, starts, buffers)
        del buffers  # the old buffers are the step's alone now: updated in place
        start = 0
        for layer_kinds in kv.quantized:
            n = 6 if layer_kinds else 2
            kv.buffers.append(new[start:start + n])
            start += n
        kv.advanced(next_now)
        mx.async_eval(logits)
        return logits

    def _advance_prefill(self, out: list) -> None:
        """Prefill chunks of the newcomers, in arrival order, up to one chunk's worth of
        tokens per step (so short prompts arriving together all start at once)."""
        budget = self.prefill_chunk
        while self.prefilling and budget > 0:
            stream = self.prefilling[0]
            before = stream.session.cache[0].offset if stream.session.cache else 0
            self._prefill_one(stream, out)
            if stream.session.cache is not None:
                budget -= max(1, stream.session.cache[0].offset - before)

    def _prefill_one(self, stream: Stream, out: list) -> None:
        try:
            if stream.should_stop():
                raise _Stopped
            logits = next(stream._prefill)
        except _Stopped:
            self.prefilling.pop(0)
            stream.finished = "cancelled"
            stream.session.record(stream.prompt.ids, [], None)
            stream.session.busy = False
            out.append((stream, self._final(stream, None)))
            return
        except BaseException:
            self.prefilling.pop(0)
            stream.session.reset()
            stream.session.busy = False
            raise
        if logits is None:
            return  # more chunks to go
        self.prefilling.pop(0)
        first = self._sample_one(stream, logits)
        stream._pending = first
        stream.stats.prompt_seconds = time.perf_counter() - stream._started
        stream._decode_start = time.perf_counter()
        self._read(stream, first.item(), out)  # the first token goes out now, not a step later
        stream._read_ahead = True
        if stream.finished is None:
            self._join(stream)
        else:  # done at its first token: its cache holds the prompt
            stream.session.record(stream.prompt.ids, stream.tokens, None)
            stream.session.busy = False

    def _join(self, stream: Stream) -> None:
        """Into a free row (growing the rows by doubling if there is none)."""
        self.program.prepare(stream.session.cache)  # the compiled step's layout
        free = [r for r, s in enumerate(self.rows) if s is None]
        if not free:
            keep = list(range(len(self.rows)))
            rows = max(1, 2 * len(self.rows))
            self.kv.resize(keep, rows)
            self.rows += [None] * (rows - len(self.rows))
            free = [r for r, s in enumerate(self.rows) if s is None]
        stream.row = free[0]
        self.rows[stream.row] = stream
        self.kv.put(stream.row, stream.session.cache, len(stream.prompt.ids))

    def _read(self, stream: Stream, token: int, out: list) -> None:
        """The stream's last sampled token, read: a chunk, or its end."""
        scores = stream.recorder.pop() if stream.recorder is not None else (None, [])
        if stream.constraint is not None and token not in self.stop_ids:
            stream.constraint.advance(token)
        if token in self.stop_ids:
            stream.finished, stream.stop_token = "stop", token
            out.append((stream, self._final(stream, token)))
            return
        stream.tokens.append(token)
        if stream.detok is not None:
            add_token(stream.detok, token)
        stream.stats.generated_tokens = len(stream.tokens)
        stream.stats.decode_seconds = time.perf_counter() - stream._decode_start
        out.append((stream, Chunk(_text(stream), token, stream.stats,
                                  tokens=stream.tokens, logprob=scores[0],
                                  top_logprobs=scores[1])))
        if stream.should_stop():
            stream.finished = "cancelled"
        elif len(stream.tokens) >= stream.settings.max_tokens:
            stream.finished = "length"
        if stream.finished is not None:
            out.append((stream, self._final(stream, None)))
        elif stream.constraint is not None:
            stream.constraint.prefetch()  # beside the other streams' reads

    def _sampled(self, streams: list[Stream]) -> list[int]:
        """The tokens the last step sampled for these streams, to the host in one transfer:
        the step's input vector when it took one, else their pending tokens."""
        if self._input is not None:
            values = self._input.tolist()
            return [values[s.row] for s in streams]
        return mx.concatenate([s._pending for s in streams]).tolist()

    def _sample(self, live: list[Stream], logits: mx.array) -> None:
        """Each live stream's next token. When every stream in the rows takes its argmax, that
        argmax over all rows is the next step's input as it is (`_next`)."""
        plain = [s.sampler.plain_greedy and s.constraint is None and s.recorder is None
                 for s in live]
        greedy = mx.argmax(logits, axis=-1) if any(plain) else None
        for s, is_plain in zip(live, plain, strict=True):
            s._pending = greedy[s.row:s.row + 1] if is_plain else \
                self._sample_one(s, logits[s.row])
        in_rows = sum(1 for s in self.rows if s is not None)
        if all(plain) and len(live) == in_rows:
            self._next = (greedy, tuple(self.rows))
            mx.async_eval(greedy)
        else:
            self._next = None
            mx.async_eval([s._pending for s in live])

    def _same_rows(self, rows: tuple) -> bool:
        return len(rows) == len(self.rows) and all(
            a is b for a, b in zip(rows, self.rows, strict=True))

    def _sample_one(self, stream: Stream, logits: mx.array) -> mx.array:
        raw = logits
        if stream.constraint is not None:
            logits = mx.where(stream.constraint.mask(), logits, -mx.inf)
        token = stream.sampler(logits)
        if stream.recorder is not None:
            mx.async_eval(stream.recorder.record(raw - mx.logsumexp(raw), token[0]))
        return token

    def _leave(self, stream: Stream) -> None:
        """Back into its session's cache, its row freed."""
        self.kv.take(stream.row, stream.session.cache)
        self.rows[stream.row] = None
        stream.row = None
        stream.session.record(stream.prompt.ids, stream.tokens, stream.stop_token)
        stream.session.busy = False

    def _shrink(self) -> None:
        """Fewer rows when few are used (a quarter or less): one stream runs at B = 1."""
        used = [r for r, s in enumerate(self.rows) if s is not None]
        if not used:
            if self.rows:
                self.kv.clear()
                self.rows = []
            return
        rows = len(self.rows)
        if len(used) * 4 > rows or rows == 1:
            return
        new_rows = 1
        while new_rows < len(used):
            new_rows *= 2
        self.kv.resize(used, new_rows)
        streams = [self.rows[r] for r in used]
        self.rows = [None] * new_rows
        for r, s in enumerate(streams):
            s.row = r
            self.rows[r] = s

    def _final(self, stream: Stream, stop_token: int | None) -> Chunk:
        if stream.detok is not None:
            stream.detok.finalize()
        stream.stats.peak_memory = mx.get_peak_memory()
        return Chunk(_text(stream), stop_token, stream.stats,
                     finish_reason=stream.finished, tokens=stream.tokens)


MAX_BATCH_CAP = 16


def device_memory() -> int:
    """The device's memory where MLX reports it, else the machine's RAM."""
    import os

    memory = mx.device_info().get("memory_size")
    return int(memory or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_max_batch(model: Model, context: int) -> int:
    """Rows whose KV caches, each at `context` tokens, fit in half the memory the weights
    leave (the device's where MLX reports it, else the machine's RAM), at most 16: a request
    waits for a free row rather than ever running the device out of memory."""
    from .loading import parameter_bytes

    cfg = model.config.text
    width = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # keys + values, up to float32
    per_row = sum((cfg.sliding_window if cfg.is_sliding(i) else context) * width
                  for i in range(cfg.num_hidden_layers))
    room = (device_memory() - parameter_bytes(model.net)) // 2
    return int(max(1, min(MAX_BATCH_CAP, room // max(per_row, 1))))


class _Stopped(Exception):
    pass


def _text(stream: Stream) -> str:
    return stream.detok.last_segment if stream.detok is not None else ""


def batch_generate(model: Model, prompts: Sequence[str], *, system: str | None = None,
                   raw: bool | None = None,
                   settings: Sequence[dict[str, Any]] | None = None,
                   max_batch: int | None = None, **sampling: Any) -> list[str]:
    """The replies to many prompts, decoded together. `sampling` applies to all, `settings`
    (one dict per prompt) overrides it per prompt:

        batch_generate(model, ["Hi", "Bye"], temp=0, settings=[{}, {"max_tokens": 5}])
    """
    from .chat import prompt_ids

    if settings is not None and len(settings) != len(prompts):
        raise BadRequest(f"settings has {len(settings)} entries for {len(prompts)} prompts: "
                         "give one per prompt")
    per_prompt = [SamplingSettings(**{**sampling, **(settings[i] if settings else {})})
                  for i in range(len(prompts))]
    for s in per_prompt:
        s.validate()
    ids = [prompt_ids(model, p, system, raw) for p in prompts]
    batch = Batch(model, max_batch or len(prompts) or 1)
    streams = [Stream(Prompt(i), s, Session(model)) for i, s in zip(ids, per_prompt,
                                                                    strict=True)]
    texts = {id(s): [] for s in streams}
    waiting = list(streams)
    try:
        while waiting or not batch.idle:
            while waiting and not batch.full:
                batch.add(waiting.pop(0))
            for stream, chunk in batch.step():
                texts[id(stream)].append(chunk.text)
    finally:
        batch.close()
    return ["".join(texts[id(s)]) for s in streams]
