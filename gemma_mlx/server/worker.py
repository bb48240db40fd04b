"""The one thread that owns MLX: it takes jobs from a bounded queue and runs them one at a time.

HTTP handlers only submit jobs and read their events; everything that touches the model, its
caches and the device happens here. A full queue refuses at once (429), a cancelled job stops
at its next token, and a job that fails leaves the worker, the pool and other clients as they
were. Batched decoding replaces `_run_one` (one job at a time) with a step over many.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from gemma_mlx.errors import GemmaError
from gemma_mlx.model.decode import release_program
from gemma_mlx.session import Session
from gemma_mlx.stopping import StopStrings

from .errors import APIError, from_library
from .jobs import Delta, Done, Failed, Job, TokenInfo
from .metrics import Metrics
from .pool import SessionPool

log = logging.getLogger("gemma_mlx.server")


class QueueFull(Exception):
    pass


class Worker:
    def __init__(self, pool: SessionPool, max_queue: int, metrics: Metrics,
                 context_limit: int):
        self.pool = pool
        self.max_queue = max_queue
        self.metrics = metrics
        self.context_limit = context_limit
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._running: Job | None = None
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gemma-mlx-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._closing.is_set() or not self._thread.is_alive():
            raise APIError(503, "the server is shutting down: try again later",
                           code="unavailable")
        with self._lock:
            ahead = self._queue.qsize() + (self._running is not None)
            if ahead > self.max_queue:  # it would wait behind a full queue
                self.metrics.rejected.inc()
                raise APIError(429, f"the server is busy ({self.max_queue} requests waiting): "
                               "retry shortly", code="queue_full", headers={"Retry-After": "1"})
            self._queue.put(job)
            self.metrics.queue_depth.set(self._queue.qsize())

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, cancel the running one and those waiting, and end the thread."""
        self._closing.set()
        if self._running is not None:
            self._running.cancel()
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing.is_set()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        try:
            while (job := self._queue.get()) is not None:
                self.metrics.queue_depth.set(self._queue.qsize())
                if self._closing.is_set():
                    job.cancel()
                if job.cancelled.is_set():
                    job.emit(Failed(APIError(503, "cancelled before it started")))
                    continue
                self._running = job
                try:
                    self._run_one(job)
                finally:
                    self._running = None
        finally:
            while not self._queue.empty():  # refuse whatever is still waiting
                if (job := self._queue.get_nowait()) is not None:
                    job.emit(Failed(APIError(503, "the server is shutting down",
                                             code="unavailable")))
            for model in (self.pool.model, self.pool.draft_model):
                if model is not None:
                    release_program(model.net.decoder)

    def _run_one(self, job: Job) -> None:
        request = job.request
        session, _ = self.pool.checkout(request.prompt)
        try:
            self._generate(job, session)
        except GemmaError as e:
            job.emit(Failed(from_library(e)))
        except Exception as e:  # a bug, not the client's: say so, keep serving
            log.exception("generation failed")
            job.emit(Failed(APIError(500, f"generation failed: {type(e).__name__}: {e}")))
        finally:
            self.pool.checkin(session)
            self.metrics.cache_bytes.set(self.pool.nbytes)
            self.metrics.images_encoded.set(self.pool.features.encoded)

    def _generate(self, job: Job, session: Session) -> None:
        request = job.request
        stops = StopStrings(request.stop)
        tokenizer = session.model.tokenizer
        chunk, parts = None, []
        started = time.perf_counter()
        chunks = session.stream(request.prompt, request.settings,
                                should_stop=job.cancelled.is_set,
                                context_limit=self.context_limit,
                                **({"logprobs": request.logprobs}
                                   if request.logprobs is not None else {}))
        finish = None
        for chunk in chunks:
            text = stops.feed(chunk.text)
            if chunk.finish_reason is not None:
                text += stops.flush()
            infos = []
            if chunk.token is not None and chunk.finish_reason is None:
                infos = [TokenInfo(chunk.token, tokenizer.decode([chunk.token]), chunk.logprob,
                                   chunk.top_logprobs)]
            if text or infos:
                parts.append(text)
                job.emit(Delta(text, infos))
            if stops.hit:
                finish = "stop"
                chunks.close()  # the session keeps what its cache read
                break
        stats = chunk.stats
        finish = finish or chunk.finish_reason
        done = Done(finish, len(request.prompt.ids), len(chunk.tokens), session.cached_tokens,
                    stats.prompt_seconds, max(time.perf_counter() - started
                                              - stats.prompt_seconds, 0.0), "".join(parts))
        self.metrics.record(done, stats)
        job.emit(done)
