"""`bench --concurrency 1,4,8,16`: N streams decoded together (continuous batching).

Each stream has its own random prompt of `--prompt-tokens` and generates `--gen-tokens`
(greedy, stop tokens ignored so that every stream runs its full length). All N arrive at
once. Reported per N, as medians over `--repeats`:

    aggregate_decode_tps   tokens generated after each stream's first, over the time from the
                           first stream's first token to the last token
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

FIGURES = ("aggregate_decode_tps", "per_stream_decode_tps", "ttft_p50_s", "ttft_p95_s",
           "peak_memory_bytes")


def parse_streams(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise BadRequest(f"--concurrency takes comma-separated numbers (got {text!r})") from e
    if not counts or min(counts) < 1:
        raise BadRequest(f"--concurrency needs stream counts of at least 1 (got {text!r})")
    return counts


def figures(first: list[float], last: list[float], counts: list[int],
            start: float) -> dict[str, float]:
    """The figures of one run from each stream's first and last token times and counts."""
    t0 = min(first)
    aggregate = sum(n - 1 for n in counts) / (max(last) - t0) if max(last) > t0 else 0.0
    per_stream = [(n - 1) / (b - a) for a, b, n in zip(first, last, counts, strict=True)
                  if n > 1 and b > a]
    ttfts = sorted(f - start for f in first)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    return {"aggregate_decode_tps": aggregate,
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
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        counts = dict.fromkeys(range(len(streams)), 0)
        index = {id(s): i for i, s in enumerate(streams)}
        start = time.perf_counter()
        for stream in streams:
            batch.add(stream)
        while not batch.idle:
            for stream, chunk in batch.step():
                if chunk.finish_reason is None:
                    i = index[id(stream)]
                    now = time.perf_counter()
                    first.setdefault(i, now)
                    last[i] = now
                    counts[i] += 1
        order = range(len(streams))
        return figures([first[i] for i in order], [last[i] for i in order],
                       [counts[i] for i in order], start)


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
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        counts: dict[int, int] = {}
        start = time.perf_counter()
        uids = generator.insert(prompts, max_tokens=[gen_tokens] * len(prompts))
        done: set[int] = set()
        try:
            while len(done) < len(uids):
                _, responses = generator.next()
                now = time.perf_counter()
                for r in responses:
                    first.setdefault(r.uid, now)
                    last[r.uid] = now
                    counts[r.uid] = counts.get(r.uid, 0) + 1
                    if r.finish_reason is not None:
                        done.add(r.uid)
        finally:
            generator.close()
        return figures([first[u] for u in uids], [last[u] for u in uids],
                       [counts[u] for u in uids], start)


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
    rows = [["streams", "impl", "aggregate tok/s", "per-stream tok/s", "ttft p50 s",
             "ttft p95 s", "peak memory"]]
    for entry in report["concurrency"]:
        for key, name in (("ours", "gemma-mlx"), ("peer", report["peer"])):
            if key not in entry:
                continue
            f = entry[key]
            rows.append([str(entry["streams"]), name, f"{f['aggregate_decode_tps']:.1f}",
                         f"{f['per_stream_decode_tps']:.1f}", f"{f['ttft_p50_s']:.2f}",
                         f"{f['ttft_p95_s']:.2f}", f"{f['peak_memory_bytes'] / 2**20:.0f} MB"])
        if "ratio" in entry:
            rows.append([str(entry["streams"]), "ratio",
                         f"{entry['ratio']['aggregate_decode_tps']:.2f}x",
                         f"{entry['ratio']['per_stream_decode_tps']:.2f}x", "", "", ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{report['model']} on {report['device']}, prompts of {report['prompt_tokens']} "
             f"tokens, {report['gen_tokens']} generated per stream"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
