"""The one thread that owns MLX: it takes jobs from a bounded queue and decodes them together.

HTTP handlers only submit jobs and read their events; everything that touches a model, its
caches and the device happens here, loading and unloading models included (`call`). Each loaded
model has a `Host`: its prefix cache and its continuous batch (gemma_mlx/batch.py). A new job
joins its model's batch at the next step, a finished one leaves, each with its own session
from the prefix cache, its own settings, stop strings and cancellation; the batches of several
loaded models take their steps in turn. With a draft model (speculative decoding, which is not
batched) jobs run one at a time instead. A full queue refuses at once (429), a cancelled job
stops at its next token, and a job that fails leaves the worker, the pools and the other
clients as they were.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from gemma_mlx.batch import Batch, Stream, default_max_batch
from gemma_mlx.engine import Chunk
from gemma_mlx.errors import GemmaError
from gemma_mlx.model.decode import release_program
from gemma_mlx.session import Session
from gemma_mlx.stopping import StopStrings
from gemma_mlx.tools import ArgumentsDelta, CallStart, ContentDelta, ReplyParser

from .errors import APIError, from_library
from .jobs import CallDelta, Delta, Done, Failed, Job, TokenInfo
from .metrics import Metrics
from .pool import SessionPool
from .registry import NotYet, ServedModel

log = logging.getLogger("gemma_mlx.server")
IDLE_POLL_S = 0.5  # how often an idle worker looks at its closing flag and at keep-alives


class Generation:
    """One job while it runs: its session, stop strings, its grammar constraint, the calls it
    parses out of the reply, and the text it has sent."""

    def __init__(self, job: Job, session: Session):
        self.job = job
        self.session = session
        self.stops = StopStrings(job.request.stop)
        fmt = job.request.reply_format
        self.constraint = fmt.constraint(session.model) if fmt is not None else None
        self.parser = ReplyParser() if job.request.parses_calls else None
        self.parts: list[str] = []
        self.started = time.perf_counter()
        self.tokenizer = session.model.tokenizer

    def should_stop(self) -> bool:
        return self.job.cancelled.is_set() or self.stops.hit

    def on_chunk(self, chunk: Chunk) -> None:
        """A chunk from the engine: its text (up to a stop string) goes to the client."""
        text = self.stops.feed(chunk.text)
        if chunk.finish_reason is not None:
            text += self.stops.flush()
        calls: list[CallDelta] = []
        if self.parser is not None:
            events = self.parser.feed(text)
            if chunk.finish_reason is not None:
                events += self.parser.finish()
            text = "".join(e.text for e in events if isinstance(e, ContentDelta))
            calls = [CallDelta(e.index, e.id, e.name) if isinstance(e, CallStart)
                     else CallDelta(e.index, arguments=e.text) for e in events
                     if isinstance(e, (CallStart, ArgumentsDelta))]
        infos = []
        if chunk.token is not None and chunk.finish_reason is None:
            infos = [TokenInfo(chunk.token, self.tokenizer.decode([chunk.token]), chunk.logprob,
                               chunk.top_logprobs)]
        if text or infos or calls:
            self.parts.append(text)
            self.job.emit(Delta(text, infos, calls))

    def done(self, chunk: Chunk) -> Done:
        finish = "stop" if self.stops.hit else chunk.finish_reason
        calls = list(self.parser.calls) if self.parser is not None else []
        if calls and finish in ("stop", "length"):
            finish = "tool_calls"
        stats = chunk.stats
        decode = max(time.perf_counter() - self.started - stats.prompt_seconds, 0.0)
        return Done(finish, len(self.job.request.prompt.ids), len(chunk.tokens),
                    self.session.cached_tokens, stats.prompt_seconds, decode, "".join(self.parts),
                    calls, list(chunk.tokens))

    def remember(self, done: Done) -> None:
        """Keep the reply's ids by its text, if they read back as exactly that text."""
        request = self.job.request
        if request.remember is None or done.tool_calls or not done.text.strip() \
                or self.tokenizer.decode(done.tokens) != done.text:
            return
        memory = self.job.served.replies
        if request.remember == "turn":
            memory.remember(done.text.strip(), done.tokens)
        else:
            memory.remember(request.raw_prompt + done.text, request.prompt.ids + done.tokens)


@dataclass
class HostOptions:
    """What the worker needs to set a loaded model up: its prefix cache and its batch."""

    max_batch: int | None = None  # None: sized to the memory (default_max_batch)
    dense_batch: bool = False
    cache_sessions: int = 4
    cache_bytes: int = 8 << 30
    kv_bits: int | None = None
    num_draft_tokens: int = 3
    one_at_a_time: bool = False  # no batch: the ranks of a distributed run follow one job


class Host:
    """A loaded model inside the worker: its prefix cache, its batch (None with a draft model:
    one job at a time) and the jobs waiting for a free row."""

    def __init__(self, served: ServedModel, options: HostOptions):
        model = served.model
        self.served = served
        alone = served.draft_model is not None or options.one_at_a_time
        self.max_batch = 1 if alone else (
            options.max_batch or default_max_batch(model, served.context_limit))
        self.pool = SessionPool(model, max(options.cache_sessions, self.max_batch),
                                options.cache_bytes, options.kv_bits, served.draft_model,
                                options.num_draft_tokens)
        self.batch = None if alone else Batch(model, self.max_batch,
                                              dense_weights=options.dense_batch)
        self.waiting: deque[Job] = deque()

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or (self.batch is not None and not self.batch.idle)

    def close(self) -> None:
        """Let go of everything on the device: caches, the compiled steps, the weights."""
        if self.batch is not None:
            self.batch.close()
        self.pool.clear()
        for m in (self.served.model, self.served.draft_model):
            if m is not None:
                release_program(m.net.decoder)


class Call:
    """A function to run on the worker thread (loading, unloading, importing), its result
    going back to the event loop."""

    def __init__(self, fn: Callable[[], Any], future: asyncio.Future,
                 loop: asyncio.AbstractEventLoop):
        self.fn, self.future, self.loop = fn, future, loop

    def run(self) -> bool:
        """False when it must wait (NotYet) and be run again later."""
        try:
            result = self.fn()
        except NotYet:
            return False
        except APIError as e:
            self._settle(e)
        except GemmaError as e:
            self._settle(from_library(e))
        except Exception as e:  # a bug, not a client's: it fails this call only
            log.exception("a model operation failed")
            self._settle(APIError(500, f"internal error: {type(e).__name__}: {e}"))
        else:
            self._settle(None, result)
        return True

    def fail(self, error: APIError) -> None:
        self._settle(error)

    def _settle(self, error: Exception | None, result: Any = None) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(settle)


class Worker:
    def __init__(self, options: HostOptions, max_queue: int, metrics: Metrics,
                 expired: Callable[[], list[ServedModel]] = list,
                 around: Callable[[], AbstractContextManager] = nullcontext):
        self.options = options
        self.max_queue = max_queue
        self.metrics = metrics
        self.expired = expired  # the registry's: idle models past their keep-alive
        self.around = around  # the thread runs inside it (a distributed run's rank 0 leads)
        self._queue: queue.Queue[Job | Call | None] = queue.Queue()
        self._lock = threading.RLock()  # submit, and jobs ending on the worker thread
        self._hosts: dict[int, Host] = {}  # by id of their ServedModel
        self._deferred: list[Call] = []  # loads waiting for room
        self._running: dict[int, Generation] = {}  # by id of their batch stream
        self._open: dict[int, int] = {}  # jobs submitted and not yet ended, by id of their model
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gemma-mlx-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._check_open()
        with self._lock:
            key = id(job.served)
            self._open[key] = self._open.get(key, 0) + 1
            if self._queued() > self.max_queue:
                self._close_one(key)
                self.metrics.rejected.inc()
                raise APIError(429, f"the server is busy ({self.max_queue} requests waiting): "
                               "retry shortly", code="queue_full", headers={"Retry-After": "1"})
            job.on_end = lambda: self._close_one(key)
            self._queue.put(job)
            self.metrics.queue_depth.set(self.waiting)

    def call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run `fn` on the worker thread; await the returned future for its result."""
        self._check_open()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(Call(fn, future, loop))
        return future

    def unload(self, served: ServedModel) -> None:
        """On the worker thread: let `served` go (the registry has taken it out already). The
        weights go with the last request that still holds the model object."""
        host = self._hosts.pop(id(served), None)
        if host is not None:
            host.close()
        for m in (served.model, served.draft_model):
            if m is not None:
                release_program(m.net.decoder)
        gc.collect()
        mx.clear_cache()
        log.info("unloaded %s", served.name)
        self.metrics.loaded.set(len(self._hosts))

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, cancel the running ones and those waiting, and end the thread."""
        self._closing.set()
        for generation in list(self._running.values()):
            generation.job.cancel()
        self._queue.put(None)
        if timeout:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing.is_set()

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + sum(len(h.waiting) for h in list(self._hosts.values()))

    @property
    def running(self) -> int:
        return len(self._running)

    def _check_open(self) -> None:
        if self._closing.is_set() or not self._thread.is_alive():
            raise APIError(503, "the server is shutting down: try again later",
                           code="unavailable")

    def _queued(self) -> int:
        """Jobs that no row would take now: counted from submission to their end, so a job
        the worker is moving between its queues is never missed (the 429 decision)."""
        return sum(max(0, n - self._rows(key)) for key, n in self._open.items())

    def _rows(self, key: int) -> int:
        host = self._hosts.get(key)
        return host.max_batch if host is not None else (self.options.max_batch or 1)

    def _close_one(self, key: int) -> None:
        with self._lock:
            self._open[key] -= 1
            if not self._open[key]:
                del self._open[key]

    # ---- the thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        with self.around():
            self._serve()

    def _serve(self) -> None:
        more = True
        try:
            while True:
                more = self._take(block=more and not self._busy) and more
                self._deferred = [c for c in self._deferred if not c.run()]
                stepped = False
                for host in list(self._hosts.values()):
                    self._admit(host)
                    if host.batch is not None and not host.batch.idle:
                        self._step(host)  # cancelled streams too: they end properly
                        stepped = True
                if not more and not stepped:
                    break
                self._expire()
        finally:
            self._shut_down()

    def _expire(self) -> None:
        for served in self.expired():
            try:
                self.unload(served)
            except Exception:  # a bug: the model is out of the registry; keep serving
                log.exception("unloading %s failed", served.name)

    @property
    def _busy(self) -> bool:
        return any(h.busy for h in self._hosts.values())

    def _take(self, block: bool) -> bool:
        """Move what was submitted to the models' hosts, running calls as they come (waiting
        a moment when nothing else is to be done). False once the worker is to end."""
        while True:
            try:
                item = self._queue.get(timeout=IDLE_POLL_S) if block else self._queue.get_nowait()
            except queue.Empty:
                return not (block and self._closing.is_set())
            block = False
            self.metrics.queue_depth.set(self.waiting)
            if item is None:
                return False
            if isinstance(item, Call):
                if self._closing.is_set():
                    item.fail(APIError(503, "the server is shutting down", code="unavailable"))
                elif not item.run():
                    self._deferred.append(item)
                continue
            if self._closing.is_set():
                item.cancel()
            if item.cancelled.is_set():
                item.emit(Failed(APIError(503, "cancelled before it started")))
                continue
            host = self._host(item.served)
            if host.batch is None:
                self._run_alone(host, item)
            else:
                host.waiting.append(item)

    def _host(self, served: ServedModel) -> Host:
        host = self._hosts.get(id(served))
        if host is None:
            host = self._hosts[id(served)] = Host(served, self.options)
            self.metrics.loaded.set(len(self._hosts))
        return host

    def _admit(self, host: Host) -> None:
        """Start waiting jobs while the model's batch has free rows."""
        while host.waiting and not host.batch.full:
            job = host.waiting.popleft()
            if job.cancelled.is_set():
                job.emit(Failed(APIError(503, "cancelled before it started")))
                continue
            self._start(host, job)
        self.metrics.queue_depth.set(self.waiting)

    def _start(self, host: Host, job: Job) -> None:
        request = job.request
        session, _ = host.pool.checkout(request.prompt)
        try:
            generation = Generation(job, session)
            stream = Stream(request.prompt, request.settings, session,
                            should_stop=generation.should_stop, logprobs=request.logprobs,
                            constraint=generation.constraint,
                            context_limit=host.served.context_limit)
            host.batch.add(stream)
        except GemmaError as e:
            host.pool.checkin(session)
            job.emit(Failed(from_library(e)))
            return
        except Exception as e:
            host.pool.checkin(session)
            log.exception("could not start a generation")
            job.emit(Failed(APIError(500, f"generation failed: {type(e).__name__}: {e}")))
            return
        self._running[id(stream)] = generation
        self.metrics.running.set(len(self._running))

    def _step(self, host: Host) -> None:
        try:
            chunks = host.batch.step()
        except Exception as e:  # a bug, not a client's: fail this batch, keep serving
            log.exception("the batched step failed")
            self._fail_all(host, APIError(500, f"generation failed: {type(e).__name__}: {e}"))
            return
        for stream, chunk in chunks:
            generation = self._running.get(id(stream))
            if generation is None:
                continue
            generation.on_chunk(chunk)
            if chunk.finish_reason is not None:
                self._finish(host, id(stream), generation, chunk)
        self.metrics.longest_gap.set(host.batch.longest_gap)

    def _finish(self, host: Host, key: int, generation: Generation, chunk: Chunk) -> None:
        done = generation.done(chunk)
        generation.remember(done)
        del self._running[key]
        host.pool.checkin(generation.session)
        self.metrics.record(done, chunk.stats)
        self.metrics.running.set(len(self._running))
        self.metrics.cache_bytes.set(sum(h.pool.nbytes for h in self._hosts.values()))
        self.metrics.images_encoded.set(sum(h.pool.features.encoded
                                            for h in self._hosts.values()))
        generation.job.emit(done)

    def _fail_all(self, host: Host, error: APIError) -> None:
        if host.batch is not None:
            host.batch.close()
        for key, generation in list(self._running.items()):
            if generation.job.served is host.served:
                host.pool.checkin(generation.session)
                generation.job.emit(Failed(error))
                del self._running[key]
        while host.waiting:
            host.waiting.popleft().emit(Failed(error))
        self.metrics.running.set(len(self._running))

    def _shut_down(self) -> None:
        error = APIError(503, "the server is shutting down", code="unavailable")
        for host in list(self._hosts.values()):
            self._fail_all(host, error)
            host.close()
        for call in self._deferred:
            call.fail(error)
        while not self._queue.empty():  # refuse whatever is still waiting
            item = self._queue.get_nowait()
            if isinstance(item, Job):
                item.emit(Failed(error))
            elif isinstance(item, Call):
                item.fail(error)

    def _run_alone(self, host: Host, job: Job) -> None:
        """One job, start to end: speculative decoding, which does not batch."""
        session, _ = host.pool.checkout(job.request.prompt)
        request = job.request
        try:
            generation = Generation(job, session)
            self._running[id(job)] = generation
            chunk = None
            extra = {"logprobs": request.logprobs} if request.logprobs is not None else {}
            if generation.constraint is not None:
                extra["constraint"] = generation.constraint
            chunks = session.stream(request.prompt, request.settings,
                                    should_stop=generation.should_stop,
                                    context_limit=host.served.context_limit, **extra)
            for chunk in chunks:
                generation.on_chunk(chunk)
            self._finish(host, id(job), generation, chunk)
        except GemmaError as e:
            self._running.pop(id(job), None)
            host.pool.checkin(session)
            job.emit(Failed(from_library(e)))
        except Exception as e:
            self._running.pop(id(job), None)
            host.pool.checkin(session)
            log.exception("generation failed")
            job.emit(Failed(APIError(500, f"generation failed: {type(e).__name__}: {e}")))
