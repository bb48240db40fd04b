"""A real server under load: N concurrent clients for T seconds, loopback only.

Each client sends chat (or, for a base model, completion) requests back to back, with random
short prompts and `--max-tokens`, and waits for each reply. Reported per run: requests,
throughput (generated tokens per second, all clients together), request latency p50 / p95,
errors (must be 0), and the server's resident memory before and after. Repeated `--runs` times
against the same server, so memory growth across runs shows.

    python benchmarks/server_load.py --model 270m --clients 4 --seconds 60 --runs 3
    python benchmarks/server_load.py --tiny --clients 8 --seconds 30 --runs 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from servers import running_server  # noqa: E402

WORDS = ("river mountain lantern orchard violin harbour meadow copper thunder garden "
         "marble falcon ember willow canyon").split()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def client_loop(url: str, name: str, chat: bool, max_tokens: int, until: float, seed: int,
                out: list) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=600) as http:
        while time.monotonic() < until:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24)))
            body = {"model": name, "max_tokens": max_tokens, "temperature": 0.8,
                    "seed": rng.randint(0, 10**6)}
            if chat:
                path, body["messages"] = "/v1/chat/completions", [{"role": "user",
                                                                    "content": text}]
            else:
                path, body["prompt"] = "/v1/completions", text
            start = time.monotonic()
            try:
                response = http.post(url + path, json=body)
                ok = response.status_code == 200
                tokens = response.json()["usage"]["completion_tokens"] if ok else 0
            except (httpx.HTTPError, ValueError, KeyError):
                ok, tokens = False, 0
            out.append((ok, tokens, time.monotonic() - start))


def one_run(server, name: str, chat: bool, clients: int, seconds: float, max_tokens: int,
            run: int) -> dict:
    before = rss_bytes(server.process.pid)
    results: list = []
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=client_loop, args=(server.url, name, chat, max_tokens,
                                                           until, 1000 * run + i, results))
               for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    latencies = sorted(r[2] for r in results if r[0])
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))] \
        if latencies else None
    return {"run": run, "requests": len(results), "errors": sum(1 for r in results if not r[0]),
            "tokens": sum(r[1] for r in results),
            "throughput_tps": sum(r[1] for r in results) / elapsed,
            "latency_p50_s": statistics.median(latencies) if latencies else None,
            "latency_p95_s": p95, "rss_before_bytes": before,
            "rss_after_bytes": rss_bytes(server.process.pid), "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a model name, folder or .gguf")
    which.add_argument("--tiny", action="store_true",
                       help="a tiny random model with the 270M's tokenizer and a chat template")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve-args", default="", help="more options for serve")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        name = args.model
        if args.tiny:
            from checkpoints import write_tiny_checkpoint

            from gemma_mlx.hub import resolve

            name = str(write_tiny_checkpoint(Path(tmp) / "tiny", resolve("270m"), vision=False,
                                             sliding_window=128))
        with running_server("--model", name, *args.serve_args.split()) as server:
            chat = "tools" in httpx.post(server.url + "/api/show", json={"model": name},
                                         timeout=60).json().get("capabilities", [])
            runs = []
            for run in range(args.runs):
                runs.append(one_run(server, name, chat, args.clients, args.seconds,
                                    args.max_tokens, run))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    report = {"model": args.model or "tiny random (270M tokenizer)", "clients": args.clients,
              "seconds": args.seconds, "max_tokens": args.max_tokens,
              "machine": platform.platform(), "date": time.strftime("%Y-%m-%d"),
              "commit": commit, "runs": runs}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
