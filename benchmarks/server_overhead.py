"""What the HTTP server costs over the library, measured side by side in one run.

1. Single-stream decode tok/s through the API (a streamed /v1/completions request to a real
   `serve` process) against `gemma_mlx.stream` on the same prompt in this process, interleaved
   run by run. Target: within 5%.
2. The time to first token of a follow-up that resends a long conversation (the server's prefix
   cache) against the library's follow-up on its kept KV cache (`Chat`, or a `Session` for a
   base model, which has no chat template). Target: at most 1.2x.

    python benchmarks/server_overhead.py --model 270m --context 1024 --json out.json
    python benchmarks/server_overhead.py --random 4b --context 4096      # on a GPU

`--random SHAPE` writes a real-shape model with random 4-bit weights to a folder (with the
270M's tokenizer and the official chat template) and serves that. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from servers import running_server  # noqa: E402

import gemma_mlx  # noqa: E402
from gemma_mlx.prompt import Prompt  # noqa: E402

FILLER = ("The river ran past the old mill, where the miller's daughter counted sacks of "
          "flour and sang to the geese. ")


def random_folder(shape: str, folder: Path, tokenizer: Path | None = None) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from gemma_mlx.bench import random_model
    from gemma_mlx.hub import resolve
    from gemma_mlx.prompt import CHAT_TEMPLATE

    model = random_model(shape)
    config = {**model.config.to_hf(), "quantization": model.quantization}
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(
        model.net.parameters())))
    tokenizer = tokenizer or resolve("270m")
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (folder / name).write_bytes((tokenizer / name).read_bytes())
    tokenizer_config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def text_of_tokens(model, n: int) -> str:
    """Filler text of about n tokens."""
    per = len(model.tokenizer.encode(FILLER, add_special_tokens=False))
    return FILLER * max(1, n // per)


def server_stream(server, name: str, body: dict, chat: bool) -> tuple[float, float, int, str]:
    """(seconds to the first token, decode tok/s after it, tokens, text) of one request."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    start = time.perf_counter()
    first = last = None
    pieces = []
    with httpx.stream("POST", server.url + path, json={"model": name, "stream": True, **body},
                      timeout=3600) as response:
        if response.status_code != 200:
            raise SystemExit(f"{path}: HTTP {response.status_code}: {response.read()[:500]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:])["choices"]
            if not choices:
                continue
            piece = (choices[0].get("delta", {}).get("content") if chat
                     else choices[0].get("text"))
            if piece:
                now = time.perf_counter()
                first = first or now
                last = now
                pieces.append(piece)
    n = len(pieces)
    decode = (n - 1) / (last - first) if n > 1 and last > first else 0.0
    return first - start, decode, n, "".join(pieces)


def library_stream(chunks) -> tuple[float, float, int, str]:
    start = time.perf_counter()
    first = last = None
    pieces = []
    for chunk in chunks:
        if chunk.finish_reason is None:
            now = time.perf_counter()
            first = first or now
            last = now
            pieces.append(chunk.text)
    n = len(pieces)
    decode = (n - 1) / (last - first) if n > 1 and last > first else 0.0
    return first - start, decode, n, "".join(pieces)


def measure(args: argparse.Namespace, model_arg: str, model) -> dict:
    chat = model.has_chat_template
    name = model_arg
    results: dict = {"decode": [], "followup": []}
    short = text_of_tokens(model, 48)
    with running_server("--model", model_arg, "--max-context", str(args.context + 512)) as srv:
        settings = {"max_tokens": args.gen_tokens, "temperature": 0}
        request = ({"messages": [{"role": "user", "content": short}]} if chat
                   else {"prompt": short})
        server_stream(srv, name, {**request, "max_tokens": 4}, chat)  # warm up both
        list(gemma_mlx.stream(model, short, raw=not chat, max_tokens=4))
        for _ in range(args.repeats):
            s = server_stream(srv, name, {**request, **settings}, chat)
            lib = library_stream(gemma_mlx.stream(model, short, raw=not chat, temp=0,
                                                  max_tokens=args.gen_tokens))
            results["decode"].append({"server_decode_tps": s[1], "library_decode_tps": lib[1],
                                      "server_tokens": s[2], "library_tokens": lib[2]})
            print(f"decode: server {s[1]:.2f} tok/s, library {lib[1]:.2f} tok/s",
                  file=sys.stderr)
        long_text = text_of_tokens(model, args.context)
        for r in range(args.repeats):
            opener = f"Story {r}: {long_text}"
            follow = "And then what happened?"
            if chat:
                first = [{"role": "user", "content": opener}]
                s1 = server_stream(srv, name, {"messages": first, "max_tokens": 8,
                                               "temperature": 0}, chat)
                s2 = server_stream(srv, name, {"messages": [
                    *first, {"role": "assistant", "content": s1[3]},
                    {"role": "user", "content": follow}], "max_tokens": 8, "temperature": 0},
                    chat)
                conversation = gemma_mlx.Chat(model, temp=0, max_tokens=8,
                                              max_context=args.context + 512)
                l1 = library_stream(conversation.stream(opener))
                l2 = library_stream(conversation.stream(follow))
            else:
                s1 = server_stream(srv, name, {"prompt": opener, "max_tokens": 8,
                                               "temperature": 0}, chat)
                s2 = server_stream(srv, name, {"prompt": opener + s1[3] + " " + follow,
                                               "max_tokens": 8, "temperature": 0}, chat)
                session = gemma_mlx.Session(model)
                ids = model.tokenizer.encode(opener)
                l1 = library_stream(session.stream(Prompt(ids), gemma_mlx.SamplingSettings(
                    temp=0, max_tokens=8)))
                again = model.tokenizer.encode(opener + l1[3] + " " + follow)
                l2 = library_stream(session.stream(Prompt(again), gemma_mlx.SamplingSettings(
                    temp=0, max_tokens=8)))
            results["followup"].append({"server_first_ttft_s": s1[0], "server_ttft_s": s2[0],
                                        "library_first_ttft_s": l1[0], "library_ttft_s": l2[0]})
            print(f"follow-up TTFT: server {s2[0]:.3f} s (first {s1[0]:.1f} s), library "
                  f"{l2[0]:.3f} s (first {l1[0]:.1f} s)", file=sys.stderr)
    return results


def summary(results: dict) -> dict:
    decode = results["decode"]
    follow = results["followup"]
    server_tps = statistics.median(r["server_decode_tps"] for r in decode)
    library_tps = statistics.median(r["library_decode_tps"] for r in decode)
    server_ttft = statistics.median(r["server_ttft_s"] for r in follow)
    library_ttft = statistics.median(r["library_ttft_s"] for r in follow)
    return {"server_decode_tps": server_tps, "library_decode_tps": library_tps,
            "decode_ratio": server_tps / library_tps if library_tps else None,
            "server_followup_ttft_s": server_ttft, "library_followup_ttft_s": library_ttft,
            "followup_ttft_ratio": server_ttft / library_ttft if library_ttft else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a model name, folder or .gguf (e.g. 270m)")
    which.add_argument("--random", metavar="SHAPE", help="a random real-shape model (4b, ...)")
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096,
                        help="tokens of the conversation the follow-up resends")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", metavar="FOLDER", type=Path,
                        help="with --random: tokenizer files to use (default: the 270M's)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_arg = args.model or str(random_folder(args.random, Path(tmp), args.tokenizer))
        model = gemma_mlx.load(model_arg)
        results = measure(args, model_arg, model)
    import mlx.core as mx

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    report = {"model": args.model or f"random {args.random}", "device": str(mx.default_device()),
              "machine": platform.platform(), "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d"), "commit": commit,
              "gen_tokens": args.gen_tokens, "context": args.context, "repeats": args.repeats,
              "summary": summary(results), **results}
    print(json.dumps(report["summary"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
