"""Per-rank memory and decode speed of the 270M on one process and on two ranks (tensor and
pipeline parallel) on this machine: the ring backend over 127.0.0.1, MLX's CPU backend.

Each configuration runs as real processes (two ranks started with MLX_RANK and MLX_HOSTFILE,
as mlx.launch would), loads the model with `load(..., distributed=...)`, and reports per rank:
the seconds to load, the bytes of its weights, MLX's peak memory once loaded and after
generating, the process's peak resident memory, and the prefill and decode speeds of a greedy
generation (stop tokens ignored). Configurations alternate round by round (medians), so a busy
machine slows them alike.

    python benchmarks/distributed_cpu.py                         # 270m, 64 + 32 tokens, 2 rounds
    python benchmarks/distributed_cpu.py --gen-tokens 64 --rounds 3 --json out.json

On two cores, two ranks share the cores a single process has to itself, and every layer adds
a round trip over loopback: expect no speed-up here. What carries over to several machines is
the memory per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {  # name: (distributed mode, compiled decode step)
    "1 process": (None, True),
    "tensor, 2 ranks": ("tensor", True),
    "tensor, 2 ranks, op by op": ("tensor", False),
    "pipeline, 2 ranks": ("pipeline", True),  # pipelines step op by op (no compiled step)
}


def rank_run(spec: dict) -> dict:
    """One rank (or the single process): load, generate `rounds` times, report."""
    import mlx.core as mx
    import numpy as np

    from gemma_mlx.engine import SamplingSettings, Stats, generate_tokens
    from gemma_mlx.loading import load, parameter_bytes

    started = time.perf_counter()
    model = load(spec["model"], distributed=spec["mode"], tokenizer=False)
    load_s = time.perf_counter() - started
    loaded_peak = mx.get_peak_memory()
    ids = np.random.default_rng(0).integers(1000, 200_000, spec["prompt_tokens"]).tolist()
    stats = Stats()
    tokens = list(generate_tokens(model, ids, model.make_cache(),
                                  SamplingSettings(temp=0.0, max_tokens=spec["gen_tokens"]),
                                  stats, compiled=spec["compiled"]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"rank": model.sharding.rank if model.sharding else 0,
            "load_s": load_s, "weights_bytes": parameter_bytes(model.net),
            "loaded_peak_bytes": loaded_peak, "peak_bytes": mx.get_peak_memory(),
            "max_rss_bytes": rss, "prefill_tps": stats.prompt_tps,
            "decode_tps": stats.decode_tps, "tokens": tokens}


def launch(spec: dict, ranks: int, timeout: float) -> list[dict]:
    """Run `rank_run` in `ranks` fresh processes (a ring on free local ports)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory() as folder:
        if ranks > 1:
            sockets = [socket.socket() for _ in range(ranks)]
            for s in sockets:
                s.bind(("127.0.0.1", 0))
            hosts = [[f"127.0.0.1:{s.getsockname()[1]}"] for s in sockets]
            for s in sockets:
                s.close()
            hostfile = Path(folder) / "hosts.json"
            hostfile.write_text(json.dumps(hosts))
        command = [sys.executable, __file__, "--rank-run", json.dumps(spec)]
        processes = [subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**env, **({"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)}
                           if ranks > 1 else {})}) for r in range(ranks)]
        results = []
        deadline = time.monotonic() + timeout
        for p in processes:
            try:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in processes:
                    q.kill()
                raise SystemExit(f"a rank ran past {timeout:.0f} s") from None
            if p.returncode != 0:
                raise SystemExit(f"a rank failed ({p.returncode}): {err[-2000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(results, key=lambda r: r["rank"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="270m")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rank-run", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_run is not None:
        print(json.dumps(rank_run(json.loads(args.rank_run))), flush=True)
        return {}
    runs: dict[str, list[list[dict]]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, (mode, compiled) in CONFIGS.items():
            spec = dict(model=args.model, mode=mode, compiled=compiled,
                        prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens)
            runs[name].append(launch(spec, 1 if mode is None else 2, args.timeout))
            speeds = ", ".join(f"{r['decode_tps']:.2f}" for r in runs[name][-1])
            print(f"{name}: decode {speeds} tok/s", file=sys.stderr, flush=True)
    reference = runs["1 process"][0][0]["tokens"]
    report = {"model": args.model, "prompt_tokens": args.prompt_tokens,
              "gen_tokens": args.gen_tokens, "rounds": args.rounds,
              "machine": machine(), "configs": {}}
    for name, rounds in runs.items():
        ranks = []
        for rank in range(len(rounds[0])):
            per_round = [r[rank] for r in rounds]
            ranks.append({key: statistics.median(r[key] for r in per_round)
                          for key in ("load_s", "weights_bytes", "loaded_peak_bytes",
                                      "peak_bytes", "max_rss_bytes", "prefill_tps",
                                      "decode_tps")})
        report["configs"][name] = {
            "ranks": ranks,
            "same_tokens_as_1_process": all(r[k]["tokens"] == reference
                                            for r in rounds for k in range(len(r)))}
    print_table(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return report


def machine() -> dict:
    import platform

    import mlx.core as mx

    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "mlx": mx.__version__, "device": str(mx.default_device())}


def print_table(report: dict) -> None:
    gb = 2**30
    print(f"{report['model']}, {report['prompt_tokens']}-token prompt, {report['gen_tokens']} "
          f"tokens, medians of {report['rounds']} rounds")
    print("| configuration | rank | weights | MLX peak, loaded | MLX peak, generating | max RSS "
          "| prefill tok/s | decode tok/s | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, config in report["configs"].items():
        same = "yes" if config["same_tokens_as_1_process"] else "NO"
        for rank, r in enumerate(config["ranks"]):
            print(f"| {name} | {rank} | {r['weights_bytes'] / gb:.3f} GiB | "
                  f"{r['loaded_peak_bytes'] / gb:.3f} GiB | {r['peak_bytes'] / gb:.3f} GiB | "
                  f"{r['max_rss_bytes'] / gb:.3f} GiB | {r['prefill_tps']:.2f} | "
                  f"{r['decode_tps']:.2f} | {same} |")


if __name__ == "__main__":
    main()
