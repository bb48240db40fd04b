"""Time to first token of each follow-up turn as a conversation grows, with KV-cache reuse,
against re-prefilling the whole conversation (what a tool without cache reuse pays).

    python benchmarks/followup_ttft.py --shape 4b --context 8192 [--user-tokens 448]
        [--reply-tokens 32] [--repeats 3] [--fresh-every 1] [--no-mlx-lm]
        [--tokenizer words|270m|FOLDER] [--json OUT]

A real `gemma_mlx.Chat` on a random real-shape model (growing_chat.py) is grown turn by turn to
about --context tokens, --repeats times (a fresh Chat each time; each point is the median over
the repeats). Per turn:

    reuse         ours as the chat app runs: from `chat.stream(text)` to the first chunk (the
                  whole conversation tokenized, the cached prefix kept, only the new tokens
                  prefilled); `engine_ttft_s` is the engine's own figure (prefill + first token)
    fresh         the same prompt (the whole conversation) into a fresh cache: our engine's
                  prefill (`gemma_mlx.bench.Ours`), and mlx-lm's `generate_step` on the same
                  weights (`gemma_mlx.bench.MlxLm`), timed as the bench command times TTFT;
                  every --fresh-every turns (and the last), after the chat turn

A warm-up conversation and a warm-up run of each implementation come first (kernels, compiled
decode traces). JSON: the header, `points` (one per turn) and `summary` (first follow-up vs
last turn).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import mlx.core as mx

from gemma_mlx.bench import MlxLm, Ours, mlx_lm_peer, prompt_ids

sys.path.insert(0, str(Path(__file__).resolve().parent))
from growing_chat import add_common_arguments, build_model, format_table, grow, header  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p, context=8192, user_tokens=448, reply_tokens=32)
    p.add_argument("--repeats", type=int, default=3, help="conversations grown (median; 3)")
    p.add_argument("--fresh-every", type=int, default=1,
                   help="time the fresh re-prefill every N turns and at the last (1; 0: never)")
    p.add_argument("--no-mlx-lm", action="store_true", help="no mlx-lm fresh re-prefill")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    model = build_model(args.shape, args.tokenizer)
    report = header(model, args, "followup_ttft")
    impls = {"fresh_ours": Ours(model)}
    if not args.no_mlx_lm:
        impls["fresh_mlx_lm"] = MlxLm(mlx_lm_peer(model))
    for impl in impls.values():  # warm-up: kernels, allocator
        impl.run(prompt_ids(16, model.config.text.vocab_size), 2)
    for _ in grow(model, min(args.context, 4 * args.reply_tokens + 128), 48,
                  args.reply_tokens):
        pass  # warm-up conversation: prefill and compiled-decode kernels, chat code paths

    runs: list[dict[int, dict]] = []
    for r in range(args.repeats):
        by_turn: dict[int, dict] = {}

        def fresh(chat, prompt, turn, by_turn=by_turn):
            every = args.fresh_every
            if every and (turn.turn % every == 0 or turn.last):
                for name, impl in impls.items():
                    by_turn[turn.turn][name] = impl.run(prompt, 1).ttft_s

        for turn in grow(model, args.context, args.user_tokens, args.reply_tokens,
                         args.first_user_tokens, after_turn=fresh,
                         start_context=args.fast_forward):
            by_turn[turn.turn] = {"context_tokens": turn.context_tokens,
                                  "prompt_tokens": turn.prompt_tokens,
                                  "prefilled_tokens": turn.prefilled_tokens,
                                  "generated_tokens": turn.generated_tokens,
                                  "reuse": turn.ttft_s, "engine_reuse": turn.engine_ttft_s}
            print(f"repeat {r} turn {turn.turn}: {turn.prompt_tokens} prompt tokens, "
                  f"{turn.prefilled_tokens} prefilled, ttft {turn.ttft_s:.3f} s",
                  file=sys.stderr, flush=True)
        for n, t in by_turn.items():
            if "fresh_ours" in t:
                print(f"repeat {r} turn {n}: fresh " + ", ".join(
                    f"{k} {t[k]:.3f} s" for k in impls if k in t), file=sys.stderr, flush=True)
        runs.append(by_turn)

    report.update(repeats=args.repeats, fresh_every=args.fresh_every,
                  peer=None if args.no_mlx_lm else "mlx-lm", points=points(runs, impls),
                  fresh_timing="gemma_mlx.bench Implementation.run(prompt, 1).ttft_s")
    report["summary"] = summary(report["points"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(table(report))
    return report


def points(runs: list[dict[int, dict]], impls: dict) -> list[dict]:
    """One point per turn present in every repeat: medians over the repeats, and each run."""
    turns = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
    out = []
    for n in turns:
        first = runs[0][n]
        point = {k: first[k] for k in ("context_tokens", "prompt_tokens", "prefilled_tokens",
                                       "generated_tokens")}
        point["turn"] = n
        for key, label in (("reuse", "ttft_s"), ("engine_reuse", "engine_ttft_s")):
            values = [r[n][key] for r in runs]
            point.setdefault("reuse", {})[label] = statistics.median(values)
            point["reuse"].setdefault("runs", {})[label] = values
        for name in impls:
            values = [r[n][name] for r in runs if name in r[n]]
            point[name] = {"ttft_s": statistics.median(values), "runs": values} if values else None
        out.append(point)
    return out


def summary(points: list[dict]) -> dict:
    if len(points) < 2:
        return {}
    first, last = points[1], points[-1]  # turn 0 is the first message, not a follow-up
    s = {"first_followup": {"prompt_tokens": first["prompt_tokens"],
                            "ttft_s": first["reuse"]["ttft_s"]},
         "last": {"prompt_tokens": last["prompt_tokens"], "ttft_s": last["reuse"]["ttft_s"]},
         "last_over_first_followup": last["reuse"]["ttft_s"] / first["reuse"]["ttft_s"]}
    for name in ("fresh_ours", "fresh_mlx_lm"):
        if last.get(name):
            s["last"][name] = last[name]["ttft_s"]
            s["last"][f"{name}_over_reuse"] = last[name]["ttft_s"] / last["reuse"]["ttft_s"]
    return s


def table(report: dict) -> str:
    head = ["turn", "prompt", "prefilled", "reuse ttft s", "engine s", "fresh ours s",
            "fresh mlx-lm s"]
    rows = []
    for p in report["points"]:
        fresh = [f"{p[k]['ttft_s']:.3f}" if p.get(k) else "-"
                 for k in ("fresh_ours", "fresh_mlx_lm")]
        rows.append([str(p["turn"]), str(p["prompt_tokens"]), str(p["prefilled_tokens"]),
                     f"{p['reuse']['ttft_s']:.3f}", f"{p['reuse']['engine_ttft_s']:.3f}",
                     *fresh])
    lines = [f"{report['model']} on {report['device']} ({report['dtype']}), time to first "
             f"token per turn, median of {report['repeats']}", format_table(head, rows)]
    s = report["summary"]
    if s:
        lines.append(f"follow-up TTFT: {s['first_followup']['ttft_s']:.3f} s at "
                     f"{s['first_followup']['prompt_tokens']} tokens, {s['last']['ttft_s']:.3f} s "
                     f"at {s['last']['prompt_tokens']} ({s['last_over_first_followup']:.2f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    mx.clear_cache()
