"""What sampling costs per token: the engine's sampler (gemma_mlx/sampling.py) against
mlx-lm's `make_sampler` chain, which sorts the whole 262k vocabulary for top-p at every token.

Decodes the same prompt with Gemma's default sampling (temp 1.0, top-p 0.95, top-k 64),
interleaved run by run, once with each sampler plugged into the engine, and reports decode
tok/s (medians) and their ratio; the draws are the same (tests/test_sampling.py), so both
runs generate the same tokens.

    python benchmarks/sampler_cost.py --model 270m --gen-tokens 48 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from datetime import date

from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

import gemma_mlx
from gemma_mlx import engine
from gemma_mlx.sampling import make_sampler as our_sampler


def decode_tps(model, prompt: str, gen_tokens: int, sampler) -> tuple[float, list[int]]:
    engine.make_sampler = sampler  # the engine builds its sampler through this name
    settings = dict(temp=1.0, top_p=0.95, top_k=64, seed=7, max_tokens=gen_tokens, raw=True)
    tokens, first = [], None
    for chunk in gemma_mlx.stream(model, prompt, **settings):
        if chunk.token is not None and first is None:
            first = time.perf_counter()
        if chunk.finish_reason is None and chunk.token is not None:
            tokens.append(chunk.token)
    seconds = time.perf_counter() - first
    return (len(tokens) - 1) / seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="270m")
    parser.add_argument("--gen-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    model = gemma_mlx.load(args.model)
    prompt = "The history of the river begins in the mountains, where"
    mlx_lm = lambda temp, top_p, min_p, top_k: mlx_lm_sampler(temp, top_p, min_p, top_k=top_k)  # noqa: E731
    runs = {"ours": [], "mlx_lm": []}
    decode_tps(model, prompt, 8, our_sampler)  # warm-up: compile the step
    same = True
    for _ in range(args.repeats):
        ours, ours_tokens = decode_tps(model, prompt, args.gen_tokens, our_sampler)
        theirs, their_tokens = decode_tps(model, prompt, args.gen_tokens, mlx_lm)
        runs["ours"].append(ours)
        runs["mlx_lm"].append(theirs)
        same &= ours_tokens == their_tokens
        print(f"ours {ours:.2f} tok/s, mlx-lm's sampler {theirs:.2f} tok/s", flush=True)
    engine.make_sampler = our_sampler
    medians = {k: statistics.median(v) for k, v in runs.items()}
    report = {"model": args.model, "gen_tokens": args.gen_tokens, "runs": runs,
              "median_tps": medians, "ratio": medians["ours"] / medians["mlx_lm"],
              "same_tokens": same, "machine": platform.platform(), "date": str(date.today()),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip()}
    print(f"decode tok/s: ours {medians['ours']:.2f}, mlx-lm's sampler "
          f"{medians['mlx_lm']:.2f} ({report['ratio']:.2f}x); same tokens: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
