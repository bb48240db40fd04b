"""Plots of the conversation and context benchmarks, from their JSON (run by hand, locally).

    pip install matplotlib          # in the dev extra; not a runtime dependency of gemma-mlx
    python benchmarks/plot.py                       # the default set, see below
    python benchmarks/plot.py RESULT.json [...]     # each PNG beside its JSON (same name)
    python benchmarks/plot.py RESULT.json --out FILE.png

The kind of plot follows the JSON's `benchmark` field:
    decode_vs_context    decode tok/s against context length, gemma-mlx and mlx-lm
    followup_ttft        time to first token per turn against conversation length: ours with
                         KV-cache reuse, and re-prefilling the whole conversation (ours, mlx-lm)
    conversation_memory  peak memory per turn against weights + KV cache, and their ratio
    concurrency          aggregate decode tok/s against streams (`bench --concurrency`'s JSON),
                         gemma-mlx and mlx-lm's BatchGenerator

Without arguments: for each kind, benchmarks/results/h100_<kind>.json if it exists (else
cpu_<kind>.json) is drawn to benchmarks/<kind>.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = ("decode_vs_context", "followup_ttft", "conversation_memory", "concurrency")


def title(report: dict, what: str) -> str:
    return f"{what}\n{report['model']}, {report['device']} ({report['dtype']}), MLX {report['mlx']}"


def plot_decode_vs_context(report: dict, ax) -> None:
    results = report["results"]
    x = [e["prompt_tokens"] for e in results]
    for side, label, color in (("ours", "gemma-mlx", "C0"), ("peer", report["peer"], "C1")):
        if not results or results[0][side] is None:
            continue
        ax.plot(x, [e[side]["decode_tps"] for e in results], "o-", color=color,
                label=f"{label} (median)")
        for e in results:
            runs = [r["decode_tps"] for r in e[side]["runs"]]
            ax.plot([e["prompt_tokens"]] * len(runs), runs, ".", color=color, alpha=0.35)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n) for n in x])
    ax.set_xlabel("context (prompt tokens before decoding)")
    ax.set_ylabel("decode tokens / s")
    ax.set_ylim(bottom=0)
    ax.set_title(title(report, f"Decode speed vs context, {report['gen_tokens']} tokens"))


def plot_followup_ttft(report: dict, ax) -> None:
    points = report["points"]
    series = (("reuse", "gemma-mlx Chat: KV cache reused (new tokens only)", "C0"),
              ("fresh_ours", "gemma-mlx: whole conversation re-prefilled", "C2"),
              ("fresh_mlx_lm", "mlx-lm: whole conversation re-prefilled", "C1"))
    for key, label, color in series:
        pts = [p for p in points if p.get(key)]
        if pts:
            ax.plot([p["prompt_tokens"] for p in pts], [p[key]["ttft_s"] for p in pts], "o-",
                    color=color, label=label, markersize=4)
    ax.set_xlabel("conversation length (prompt tokens of the turn)")
    ax.set_ylabel("time to first token (s)")
    ax.set_ylim(bottom=0)
    ax.set_title(title(report, f"Follow-up time to first token ({report['user_tokens']}-token "
                               f"messages), median of {report['repeats']}"))


def plot_conversation_memory(report: dict, ax) -> None:
    turns = report["turns"]
    gb = 2**30
    x = [t["context_tokens"] for t in turns]
    weights = [t["weights_bytes"] / gb for t in turns]
    kv = [t["kv_cache_bytes"] / gb for t in turns]
    ax.stackplot(x, weights, kv, labels=["weights", "KV cache"], colors=["C7", "C2"], alpha=0.5)
    ax.plot(x, [t["peak_memory_bytes"] / gb for t in turns], "o-", color="C3",
            label="MLX peak memory (per turn)", markersize=4)
    ax.plot(x, [report["target_ratio"] * (w + k) for w, k in zip(weights, kv, strict=True)],
            "--", color="C3", alpha=0.5, label=f"{report['target_ratio']:.2f} x (weights + KV)")
    ax.set_xlabel("tokens in the conversation")
    ax.set_ylabel("GiB")
    ax.set_ylim(bottom=0)
    s = report.get("summary") or {}
    ratio = f": peak / (weights + KV) = {s['peak_ratio']:.3f} at the end" if s else ""
    ax.set_title(title(report, f"Conversation memory{ratio}"))


def plot_concurrency(report: dict, ax) -> None:
    rows = report["concurrency"]
    streams = [r["streams"] for r in rows]
    for side, label, color in (("ours", "gemma-mlx", "C0"), ("peer", report["peer"], "C1")):
        if rows and rows[0].get(side):
            ax.plot(streams, [r[side]["aggregate_decode_tps"] for r in rows], "o-", color=color,
                    label=f"{label} (median of {report['repeats']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(streams, [str(n) for n in streams])
    ax.set_xlabel("streams decoded together")
    ax.set_ylabel("aggregate decode tok/s")
    dense = ", dense batch weights" if report.get("dense_batch") else ""
    ax.set_title(title(report, f"Continuous batching: {report['prompt_tokens']}-token prompts, "
                               f"{report['gen_tokens']} generated each{dense}"), fontsize=9)


PLOTS = {"decode_vs_context": plot_decode_vs_context, "followup_ttft": plot_followup_ttft,
         "conversation_memory": plot_conversation_memory, "concurrency": plot_concurrency}


def draw(source: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(source.read_text())
    kind = report.get("benchmark") or ("concurrency" if "concurrency" in report else None)
    if kind not in PLOTS:
        raise SystemExit(f"{source}: not a result of {', '.join(KINDS)} (benchmark: {kind})")
    fig, ax = plt.subplots(figsize=(8, 5))
    PLOTS[kind](report, ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"{source} -> {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="PNG plots from the benchmarks' JSON")
    p.add_argument("json", nargs="*", type=Path)
    p.add_argument("--out", type=Path, default=None, help="the PNG (with one JSON only)")
    args = p.parse_args(argv)
    if args.out and len(args.json) != 1:
        p.error("--out takes exactly one JSON")
    if args.json:
        for source in args.json:
            draw(source, args.out or source.with_suffix(".png"))
        return
    for kind in KINDS:
        for machine in ("h100", "h200", "cpu"):
            source = HERE / "results" / f"{machine}_{kind}.json"
            if source.exists():
                draw(source, HERE / f"{kind}.png")
                break


if __name__ == "__main__":
    main()
