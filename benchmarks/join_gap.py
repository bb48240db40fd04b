"""How long the running streams wait while a long prompt joins the batch.

K streams decode (greedy, stop tokens ignored); once they run, a newcomer with a
`--join-tokens` prompt arrives. Its prefill runs one chunk per step between their decode steps,
so their longest gap between tokens is about one chunk's prefill plus one step, instead of the
whole prompt's. Reported per prefill chunk size: the running streams' median and longest gap,
and the newcomer's time to first token.

    python benchmarks/join_gap.py --random 4b --streams 4 --join-tokens 4096 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402

from gemma_mlx.batch import Batch, Stream  # noqa: E402
from gemma_mlx.bench import prompt_ids, random_model  # noqa: E402
from gemma_mlx.engine import SamplingSettings  # noqa: E402
from gemma_mlx.prompt import Prompt  # noqa: E402
from gemma_mlx.session import Session  # noqa: E402


def run(model, streams: int, join_tokens: int, chunk: int, gen: int) -> dict:
    vocab = model.config.text.vocab_size
    batch = Batch(model, max_batch=streams + 1, prefill_chunk=chunk, stop_ids=set())
    running = [Stream(Prompt(prompt_ids(64, vocab, seed=i)),
                      SamplingSettings(temp=0, max_tokens=gen), Session(model))
               for i in range(streams)]
    newcomer = Stream(Prompt(prompt_ids(join_tokens, vocab, seed=99)),
                      SamplingSettings(temp=0, max_tokens=4), Session(model))
    for s in running:
        batch.add(s)
    times: dict[int, list[float]] = {id(s): [] for s in running}
    joined_at = first_token = None
    steps = 0
    while not batch.idle:
        for stream, chunk_ in batch.step():
            now = time.perf_counter()
            if stream is newcomer:
                if first_token is None and chunk_.finish_reason is None:
                    first_token = now
            elif chunk_.finish_reason is None:
                times[id(stream)].append(now)
        steps += 1
        if steps == 8:  # they run: the long prompt arrives
            batch.add(newcomer)
            joined_at = time.perf_counter()
    gaps_during = []
    all_gaps = []
    for ts in times.values():
        for a, b in zip(ts, ts[1:], strict=False):
            all_gaps.append(b - a)
            if joined_at <= b and a <= (first_token or b):
                gaps_during.append(b - a)
    return {"prefill_chunk": chunk, "median_gap_s": statistics.median(all_gaps),
            "longest_gap_during_join_s": max(gaps_during) if gaps_during else None,
            "newcomer_ttft_s": (first_token - joined_at) if first_token else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", default="4b", help="shape (random 4-bit weights)")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--join-tokens", type=int, default=4096)
    parser.add_argument("--chunks", default="256,512,1024,2048")
    parser.add_argument("--gen-tokens", type=int, default=0,
                        help="tokens per running stream (default: enough to outlast the join)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    model = random_model(args.random)
    gen = args.gen_tokens or 40 + args.join_tokens // 64
    run(model, args.streams, 512, 512, 16)  # warm-up: traces
    results = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        results.append(run(model, args.streams, args.join_tokens, chunk, gen))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    report = {"model": model.description, "device": str(mx.default_device()),
              "streams": args.streams, "join_tokens": args.join_tokens, "results": results}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
