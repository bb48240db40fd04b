"""/metrics in Prometheus' text format, from a registry of the app's own (so that several apps
in one process, as in tests, keep separate counts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from gemma_mlx.engine import Stats

PREFIX = "gemma_mlx_"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "HTTP requests by route and status",
                                ["path", "status"], registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens read", registry=r)
        self.completion_tokens = Counter(PREFIX + "completion_tokens", "Tokens generated",
                                         registry=r)
        self.cached_tokens = Counter(PREFIX + "cached_tokens",
                                     "Prompt tokens reused from the prefix cache", registry=r)
        self.cache_hits = Counter(PREFIX + "prefix_cache_hits",
                                  "Generations that reused a cached prefix", registry=r)
        self.generations = Counter(PREFIX + "generations", "Generations by finish reason",
                                   ["finish_reason"], registry=r)
        self.rejected = Counter(PREFIX + "rejected", "Requests refused: queue full", registry=r)
        self.queue_depth = Gauge(PREFIX + "queue_depth", "Requests waiting for the model",
                                 registry=r)
        self.running = Gauge(PREFIX + "running", "Requests being generated (the batch)",
                             registry=r)
        self.longest_gap = Gauge(PREFIX + "longest_step_gap_seconds",
                                 "Longest time between two steps of running streams",
                                 registry=r)
        self.prefill_tps = Gauge(PREFIX + "prefill_tokens_per_second",
                                 "Prefill speed of the last generation", registry=r)
        self.decode_tps = Gauge(PREFIX + "decode_tokens_per_second",
                                "Decode speed of the last generation", registry=r)
        self.images_encoded = Gauge(PREFIX + "images_encoded",
                                    "Pictures run through the vision tower (each once)",
                                    registry=r)
        self.loaded = Gauge(PREFIX + "loaded_models", "Models loaded now", registry=r)
        self.cache_bytes = Gauge(PREFIX + "prefix_cache_bytes", "Memory of the cached KV",
                                 registry=r)

    def record(self, done, stats: Stats) -> None:
        """One finished generation (a jobs.Done)."""
        self.prompt_tokens.inc(done.prompt_tokens)
        self.completion_tokens.inc(done.completion_tokens)
        self.cached_tokens.inc(done.cached_tokens)
        if done.cached_tokens:
            self.cache_hits.inc()
        self.generations.labels(done.finish_reason).inc()
        if stats.prompt_tps:
            self.prefill_tps.set(stats.prompt_tps)
        if stats.decode_tps:
            self.decode_tps.set(stats.decode_tps)

    def text(self) -> bytes:
        return generate_latest(self.registry)
