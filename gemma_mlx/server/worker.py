"""The one thread that owns MLX: it takes jobs from a bounded queue and decodes them together.

HTTP handlers only submit jobs and read their events; everything that touches the model, its
caches and the device happens here. Jobs run in a continuous batch (gemma_mlx/batch.py): a new
one joins at the next step, a finished one leaves, each with its own session from the prefix
cache, its own settings, stop strings and cancellation. With a draft model (speculative
decoding, which is not batched) they run one at a time instead. A full queue refuses at once
(429), a cancelled job stops at its next token, and a job that fails leaves the worker, the pool
and the other clients as they were.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from gemma_mlx.batch import Batch, Stream
from gemma_mlx.engine import Chunk
from gemma_mlx.errors import GemmaError
from gemma_mlx.model.decode import release_program
from gemma_mlx.session import Session
from gemma_mlx.stopping import StopStrings

from .errors import APIError, from_library
from .jobs import Delta, Done, Failed, Job, TokenInfo
from .metrics import Metrics
from .pool import SessionPool

log = logging.getLogger("gemma_mlx.server")
IDLE_POLL_S = 0.5  # how often an idle worker looks at its closing flag


class Generation:
    """One job while it runs: its session, stop strings and the text it has sent."""

    def __init__(self, job: Job, session: Session):
        self.job = job
        self.session = session
        self.stops = StopStrings(job.request.stop)
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
        infos = []
        if chunk.token is not None and chunk.finish_reason is None:
            infos = [TokenInfo(chunk.token, self.tokenizer.decode([chunk.token]), chunk.logprob,
                               chunk.top_logprobs)]
        if text or infos:
            self.parts.append(text)
            self.job.emit(Delta(text, infos))

    def done(self, chunk: Chunk) -> Done:
        finish = "stop" if self.stops.hit else chunk.finish_reason
        stats = chunk.stats
        decode = max(time.perf_counter() - self.started - stats.prompt_seconds, 0.0)
        return Done(finish, len(self.job.request.prompt.ids), len(chunk.tokens),
                    self.session.cached_tokens, stats.prompt_seconds, decode, "".join(self.parts))


class Worker:
    def __init__(self, pool: SessionPool, max_queue: int, metrics: Metrics,
                 context_limit: int, max_batch: int = 8, dense_batch: bool = False):
        self.pool = pool
        self.max_queue = max_queue
        self.metrics = metrics
        self.context_limit = context_limit
        self.max_batch = 1 if pool.draft_model is not None else max_batch
        self.dense_batch = dense_batch
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._running: dict[int, Generation] = {}  # by id of their batch stream
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gemma-mlx-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._closing.is_set() or not self._thread.is_alive():
            raise APIError(503, "the server is shutting down: try again later",
                           code="unavailable")
        with self._lock:
            free = self.max_batch - len(self._running)
            if self._queue.qsize() - free >= self.max_queue:  # it would wait behind a full queue
                self.metrics.rejected.inc()
                raise APIError(429, f"the server is busy ({self.max_queue} requests waiting): "
                               "retry shortly", code="queue_full", headers={"Retry-After": "1"})
            self._queue.put(job)
            self.metrics.queue_depth.set(self._queue.qsize())

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
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return len(self._running)

    # ---- the thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        model = self.pool.model
        batch = None
        if self.pool.draft_model is None:
            batch = Batch(model, self.max_batch, dense_weights=self.dense_batch)
        try:
            while True:
                more = self._admit(batch)
                if batch is not None and not batch.idle:
                    self._step(batch)  # cancelled streams too: they end properly
                elif not more:
                    break
        finally:
            if batch is not None:
                self._fail_all(batch, APIError(503, "the server is shutting down",
                                               code="unavailable"))
            while not self._queue.empty():  # refuse whatever is still waiting
                if (job := self._queue.get_nowait()) is not None:
                    job.emit(Failed(APIError(503, "the server is shutting down",
                                             code="unavailable")))
            for m in (self.pool.model, self.pool.draft_model):
                if m is not None:
                    release_program(m.net.decoder)

    def _admit(self, batch: Batch | None) -> bool:
        """Take waiting jobs while there is room (waiting for one when nothing runs). False
        when the worker is to end."""
        while batch is None or not batch.full:
            idle = batch is None or batch.idle
            try:
                job = self._queue.get(timeout=IDLE_POLL_S) if idle else self._queue.get_nowait()
            except queue.Empty:
                if idle and self._closing.is_set():
                    return False
                return True
            self.metrics.queue_depth.set(self._queue.qsize())
            if job is None:
                return False
            if self._closing.is_set():
                job.cancel()
            if job.cancelled.is_set():
                job.emit(Failed(APIError(503, "cancelled before it started")))
                continue
            if batch is None:
                self._run_alone(job)
                continue
            self._start(batch, job)
        return True

    def _start(self, batch: Batch, job: Job) -> None:
        request = job.request
        session, _ = self.pool.checkout(request.prompt)
        generation = Generation(job, session)
        stream = Stream(request.prompt, request.settings, session,
                        should_stop=generation.should_stop, logprobs=request.logprobs,
                        context_limit=self.context_limit)
        try:
            batch.add(stream)
        except GemmaError as e:
            self.pool.checkin(session)
            job.emit(Failed(from_library(e)))
            return
        except Exception as e:
            self.pool.checkin(session)
            log.exception("could not start a generation")
            job.emit(Failed(APIError(500, f"generation failed: {type(e).__name__}: {e}")))
            return
        self._running[id(stream)] = generation
        self.metrics.running.set(len(self._running))

    def _step(self, batch: Batch) -> None:
        try:
            chunks = batch.step()
        except Exception as e:  # a bug, not a client's: fail this batch, keep serving
            log.exception("the batched step failed")
            self._fail_all(batch, APIError(500, f"generation failed: {type(e).__name__}: {e}"))
            return
        for stream, chunk in chunks:
            generation = self._running.get(id(stream))
            if generation is None:
                continue
            generation.on_chunk(chunk)
            if chunk.finish_reason is not None:
                self._finish(id(stream), generation, chunk)
        self.metrics.longest_gap.set(batch.longest_gap)

    def _finish(self, key: int, generation: Generation, chunk: Chunk) -> None:
        done = generation.done(chunk)
        del self._running[key]
        self.pool.checkin(generation.session)
        self.metrics.record(done, chunk.stats)
        self.metrics.running.set(len(self._running))
        self.metrics.cache_bytes.set(self.pool.nbytes)
        self.metrics.images_encoded.set(self.pool.features.encoded)
        generation.job.emit(done)

    def _fail_all(self, batch: Batch, error: APIError) -> None:
        batch.close()
        for generation in self._running.values():
            self.pool.checkin(generation.session)
            generation.job.emit(Failed(error))
        self._running.clear()
        self.metrics.running.set(0)

    def _run_alone(self, job: Job) -> None:
        """One job, start to end: speculative decoding, which does not batch."""
        session, _ = self.pool.checkout(job.request.prompt)
        generation = Generation(job, session)
        self._running[id(job)] = generation
        request = job.request
        try:
            chunk = None
            extra = {"logprobs": request.logprobs} if request.logprobs is not None else {}
            chunks = session.stream(request.prompt, request.settings,
                                    should_stop=generation.should_stop,
                                    context_limit=self.context_limit, **extra)
            for chunk in chunks:
                generation.on_chunk(chunk)
            self._finish(id(job), generation, chunk)
        except GemmaError as e:
            self._running.pop(id(job), None)
            self.pool.checkin(session)
            job.emit(Failed(from_library(e)))
        except Exception as e:
            self._running.pop(id(job), None)
            self.pool.checkin(session)
            log.exception("generation failed")
            job.emit(Failed(APIError(500, f"generation failed: {type(e).__name__}: {e}")))
