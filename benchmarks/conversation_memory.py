"""Peak memory of a conversation as it grows, against what it must hold: weights + KV cache.

    python benchmarks/conversation_memory.py --shape 4b --context 8192 [--user-tokens 448]
        [--reply-tokens 64] [--first-user-tokens N] [--clear-cache] [--kv-bits 4|8]
        [--tokenizer words|270m|FOLDER] [--json OUT]

A real `gemma_mlx.Chat` on a random real-shape model (growing_chat.py) is sent user messages of
--user-tokens and answers greedily with up to --reply-tokens, turn after turn, until the
conversation holds about --context tokens. Per turn (MLX's figures; peak reset at the turn's
start, so each turn's peak is its own):

    context_tokens             tokens in the KV cache after the turn
    prefilled_tokens           tokens this turn prefilled (the rest was reused from the cache)
    peak_memory_bytes          MLX peak memory over the turn (`mx.get_peak_memory`)
    peak_to_first_token_bytes  the same up to the first token (prefill's share)
    active_memory_bytes        MLX active memory after the turn
    cache_memory_bytes         MLX's allocator cache after the turn (freed buffers kept for reuse;
                               not in the peak; --clear-cache empties it before every turn)
    weights_bytes              sum of the parameters' nbytes
    kv_cache_bytes             sum of the KV cache arrays' nbytes (unused capacity included)
    kv_used_bytes              of which the tokens they hold
    peak_ratio                 peak_memory_bytes / (weights_bytes + kv_cache_bytes); the target
                               is at most 1.10 at 8K tokens on the 4B

The JSON also has `summary`: the last turn's figures, the largest ratio over all turns and
whether the last turn is within the target.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from growing_chat import add_common_arguments, build_model, format_table, grow, header  # noqa: E402

TARGET_RATIO = 1.10
MB = 2**20


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p, context=8192, user_tokens=448, reply_tokens=64)
    p.add_argument("--clear-cache", action="store_true",
                   help="mx.clear_cache() before every turn")
    p.add_argument("--kv-bits", type=int, default=None,
                   help="quantize the global layers' KV cache (4 or 8), where Chat supports it")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    model = build_model(args.shape, args.tokenizer)
    options = {"kv_bits": args.kv_bits} if args.kv_bits else {}
    report = header(model, args, "conversation_memory")
    report.update(clear_cache=args.clear_cache, kv_bits=args.kv_bits,
                  target_ratio=TARGET_RATIO, turns=[])
    for turn in grow(model, args.context, args.user_tokens, args.reply_tokens,
                     args.first_user_tokens, args.clear_cache, options,
                     start_context=args.fast_forward):
        report["turns"].append(asdict(turn))
        print(f"turn {turn.turn}: {turn.context_tokens} tokens, peak "
              f"{turn.peak_memory_bytes / MB:.1f} MB, ratio {turn.peak_ratio:.3f}, "
              f"ttft {turn.ttft_s:.3f} s", file=sys.stderr, flush=True)
    turns = report["turns"]
    if turns:
        last = turns[-1]
        report["summary"] = {
            "context_tokens": last["context_tokens"], "peak_ratio": last["peak_ratio"],
            "peak_memory_bytes": last["peak_memory_bytes"],
            "weights_bytes": last["weights_bytes"], "kv_cache_bytes": last["kv_cache_bytes"],
            "excess_bytes": last["peak_memory_bytes"] - last["weights_bytes"]
            - last["kv_cache_bytes"],
            "max_peak_ratio": max(t["peak_ratio"] for t in turns),
            "within_target": last["peak_ratio"] <= TARGET_RATIO,
        }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(table(report))
    return report


def table(report: dict) -> str:
    head = ["turn", "context", "prefilled", "peak MB", "to 1st MB", "active MB", "weights MB",
            "KV MB", "excess MB", "peak/(w+KV)", "ttft s"]
    rows = []
    for t in report["turns"]:
        base = t["weights_bytes"] + t["kv_cache_bytes"]
        rows.append([str(t["turn"]), str(t["context_tokens"]), str(t["prefilled_tokens"]),
                     f"{t['peak_memory_bytes'] / MB:.1f}",
                     f"{t['peak_to_first_token_bytes'] / MB:.1f}",
                     f"{t['active_memory_bytes'] / MB:.1f}", f"{t['weights_bytes'] / MB:.1f}",
                     f"{t['kv_cache_bytes'] / MB:.1f}",
                     f"{(t['peak_memory_bytes'] - base) / MB:.1f}", f"{t['peak_ratio']:.3f}",
                     f"{t['ttft_s']:.3f}"])
    title = (f"{report['model']} on {report['device']} ({report['dtype']}), user "
             f"{report['user_tokens']} / reply {report['reply_tokens']} tokens per turn")
    lines = [title, format_table(head, rows)]
    s = report.get("summary")
    if s:
        lines.append(f"at {s['context_tokens']} tokens: peak / (weights + KV) = "
                     f"{s['peak_ratio']:.3f} (target {report['target_ratio']:.2f}: "
                     f"{'met' if s['within_target'] else 'NOT met'}); largest over the turns "
                     f"{s['max_peak_ratio']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    mx.clear_cache()
