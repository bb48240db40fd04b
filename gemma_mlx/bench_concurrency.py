"""`bench --concurrency 1,4,8,16`: N streams decoded together (continuous batching).

Each stream has its own random prompt of `--prompt-tokens` and generates `--gen-tokens`
(greedy, stop tokens ignored so that every stream runs its full length). All N arrive at
once. Reported per N, as medians over `--repeats`:

    aggregate_decode_tps   tokens generated while every stream is decoding: from the last
                           stream's first token to the last token. (Measured over a window
                           that starts with the first stream's first token instead, ours
                           would count the later newcomers' prefills, which run between its
                           steps, while mlx-lm's BatchGenerator prefills every stream before
                           any decodes: not the same work.)
    throughput_tps         every token generated, over the whole run (prefills included)
    per_stream_decode_tps  the median stream's own decode tok/s (after its first token)
    ttft_p50_s / p95_s     the streams' times to first token (prefills queue up: the last
                           newcomer waits for the others' chunks)
    peak_memory_bytes

`--compare mlx-lm` runs mlx-lm's BatchGenerator on the same weights, interleaved run by run,
with the ratios ours / peer.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import mlx.core as mx

from .batch import Batch, Stream
from .engine import SamplingSettings
from .errors import BadRequest
from .loading import Model
from .prompt import Prompt
from .session import Session

FIGURES = ("aggregate_decode_tps", "throughput_tps", "per_stream_decode_tps", "ttft_p50_s",
           "ttft_p95_s", "peak_memory_bytes")


def parse_streams(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise BadRequest(f"--concurrency takes comma-separated numbers (got {text!r})") from e
    if not counts or min(counts) < 1:
        raise BadRequest(f"--concurrency needs stream counts of at least 1 (got {text!r})")
    return counts


def figures(times: list[list[float]], start: float) -> dict[str, float]:
    """The figures of one run from each stream's token times."""
    first = [t[0] for t in times]
    end = max(t[-1] for t in times)
    all_decoding = max(first)
    together = sum(1 for t in times for x in t[1:] if x > all_decoding)
    aggregate = together / (end - all_decoding) if end > all_decoding else 0.0
    per_stream = [(len(t) - 1) / (t[-1] - t[0]) for t in times if len(t) > 1 and t[-1] > t[0]]
    ttfts = sorted(f - start for f in first)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    return {"aggregate_decode_tps": aggregate,
            "throughput_tps": sum(len(t) for t in times) / (end - start),
            "per_stream_decode_tps": statistics.median(per_stream) if per_stream else 0.0,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": p95,
            "peak_memory_bytes": mx.get_peak_memory()}


class OursBatched:
    name = "gemma-mlx"

    def __init__(self, model: Model, dense_weights: bool = False):
        self.model = model
        self.dense_weights = dense_weights

    def run(self, prompts: list[list[int]], gen_tokens: int) -> dict[str, float]:
        mx.clear_cache()
        mx.reset_peak_memory()
        batch = Batch(self.model, max_batch=len(prompts), stop_ids=set(),
                      dense_weights=self.dense_weights)
        settings = SamplingSettings(temp=0, max_tokens=gen_tokens)
        streams = [Stream(Prompt(p), settings, Session(self.model)) for p in prompts]
        times: dict[int, list[float]] = {id(s): [] for s in streams}
        start = time.perf_counter()
        for stream in streams:
            batch.add(stream)
        while not batch.idle:
            for stream, chunk in batch.step():
                if chunk.finish_reason is None:
                    times[id(stream)].append(time.perf_counter())
        return figures(list(times.values()), start)


class MlxLmBatched:
    name = "mlx-lm BatchGenerator"

    def __init__(self, ref: Any):
        self.ref = ref

    def run(self, prompts: list[list[int]], gen_tokens: int) -> dict[str, float]:
        from mlx_lm.generate import BatchGenerator

        mx.clear_cache()
        mx.reset_peak_memory()
        generator = BatchGenerator(self.ref, max_tokens=gen_tokens,
                                   completion_batch_size=len(prompts),
                                   prefill_batch_size=min(8, len(prompts)))
        start = time.perf_counter()
        uids = generator.insert(prompts, max_tokens=[gen_tokens] * len(prompts))
        times: dict[int, list[float]] = {u: [] for u in uids}
        done: set[int] = set()
        try:
            while len(done) < len(uids):
                _, responses = generator.next()
                now = time.perf_counter()
                for r in responses:
                    times[r.uid].append(now)
                    if r.finish_reason is not None:
                        done.add(r.uid)
        finally:
            generator.close()
        return figures([times[u] for u in uids], start)


def measure(model: Model, peer: Any, stream_counts: list[int], prompt_tokens: int,
            gen_tokens: int, repeats: int, progress: Any,
            dense_weights: bool = False) -> list[dict]:
    from .bench import prompt_ids

    vocab = model.config.text.vocab_size
    ours = OursBatched(model, dense_weights)
    results = []
    for n in stream_counts:
        prompts = [prompt_ids(prompt_tokens, vocab, seed=i) for i in range(n)]
        ours.run(prompts, 4)  # traces (every batch size on the way to n) and warms up
        if peer is not None:
            peer.run(prompts, 4)
        runs: dict[str, list[dict]] = {"ours": [], "peer": []}
        for r in range(repeats):
            runs["ours"].append(ours.run(prompts, gen_tokens))
            if peer is not None:
                runs["peer"].append(peer.run(prompts, gen_tokens))
            progress(f"{n} streams, run {r + 1}/{repeats}: ours "
                     f"{runs['ours'][-1]['aggregate_decode_tps']:.1f} tok/s"
                     + (f", {peer.name} {runs['peer'][-1]['aggregate_decode_tps']:.1f} tok/s"
                        if peer is not None else ""))
        entry = {"streams": n, "ours": _median(runs["ours"]), "runs": runs}
        if peer is not None:
            entry["peer"] = _median(runs["peer"])
            entry["ratio"] = {k: entry["ours"][k] / entry["peer"][k] if entry["peer"][k] else None
                              for k in FIGURES}
        results.append(entry)
    return results


def _median(runs: list[dict]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in FIGURES}


def table(report: dict) -> str:
    rows = [["streams", "impl", "aggregate tok/s", "throughput tok/s", "per-stream tok/s",
             "ttft p50 s", "ttft p95 s", "peak memory"]]
    for entry in report["concurrency"]:
        for key, name in (("ours", "gemma-mlx"), ("peer", report["peer"])):
            if key not in entry:
                continue
            f = entry[key]
            rows.append([str(entry["streams"]), name, f"{f['aggregate_decode_tps']:.1f}",
                         f"{f['throughput_tps']:.1f}", f"{f['per_stream_decode_tps']:.1f}",
                         f"{f['ttft_p50_s']:.2f}", f"{f['ttft_p95_s']:.2f}",
                         f"{f['peak_memory_bytes'] / 2**20:.0f} MB"])
        if "ratio" in entry:
            rows.append([str(entry["streams"]), "ratio",
                         f"{entry['ratio']['aggregate_decode_tps']:.2f}x",
                         f"{entry['ratio']['throughput_tps']:.2f}x",
                         f"{entry['ratio']['per_stream_decode_tps']:.2f}x", "", "", ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{report['model']} on {report['device']}, prompts of {report['prompt_tokens']} "
             f"tokens, {report['gen_tokens']} generated per stream"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
