"""Decode speed against context length, gemma-mlx vs mlx-lm on the same weights.

    python benchmarks/decode_vs_context.py --shape 4b [--contexts 512,2048,8192,16384,32768]
        [--gen-tokens 128] [--repeats 2] [--no-compare] [--json OUT]

The bench command's machinery (`gemma_mlx.bench`: `random_model`, `Ours`, `MlxLm`, `measure`):
for each context length a random prompt of that many tokens is prefilled, then --gen-tokens
are decoded greedily; decode tok/s counts the tokens after the first over the time after the
first, so it is the speed at that context. Runs interleave ours / mlx-lm / mlx-lm / ours ...,
figures are medians over --repeats. The JSON is the bench command's report (its `results`, one
per context, under the same field names) with `benchmark` and `shape` added; the table shows
decode tok/s per context.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx_lm.generate import wired_limit

from gemma_mlx.bench import SHAPES, MlxLm, Ours, measure, mlx_lm_peer, random_model
from gemma_mlx.model.decode import decode_program

sys.path.insert(0, str(Path(__file__).resolve().parent))
from growing_chat import float_dtype, format_table  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=tuple(SHAPES), default="4b")
    p.add_argument("--contexts", default="512,2048,8192,16384,32768",
                   help="comma-separated context lengths (prompt tokens before decoding)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens decoded per run (128)")
    p.add_argument("--repeats", type=int, default=2, help="runs per figure, median (2)")
    p.add_argument("--no-compare", action="store_true", help="ours only")
    p.add_argument("--json", default=None, help="write the report here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    model = random_model(args.shape)
    limit = model.config.text.max_position_embeddings
    if max(contexts) + args.gen_tokens > limit:
        raise SystemExit(f"context {max(contexts)} + {args.gen_tokens} generated tokens exceed "
                         f"the {args.shape} shape's window ({limit})")
    decode_program(model.net.decoder)  # fuse in place first: the peer shares the same arrays
    peer = None if args.no_compare else MlxLm(mlx_lm_peer(model))

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with wired_limit(model.net):  # Metal: keep the weights wired (as the bench); no-op elsewhere
        results = measure(Ours(model), peer, contexts, args.gen_tokens, args.repeats,
                          model.config.text.vocab_size, progress)
    report = {
        "benchmark": "decode_vs_context", "shape": args.shape, "model": model.description,
        "device": str(mx.default_device()), "dtype": float_dtype(model),
        "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "gen_tokens": args.gen_tokens,
        "repeats": args.repeats, "compiled": True, "peer": None if peer is None else "mlx-lm",
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(table(report))
    return report


def table(report: dict) -> str:
    head = ["context", "ours decode tok/s", "mlx-lm decode tok/s", "ratio", "ours ttft s",
            "mlx-lm ttft s", "ours peak GB", "mlx-lm peak GB"]
    rows = []
    for e in report["results"]:
        ours, peer = e["ours"], e["peer"]
        rows.append([str(e["prompt_tokens"]), f"{ours['decode_tps']:.2f}",
                     f"{peer['decode_tps']:.2f}" if peer else "-",
                     f"{e['ratio']['decode_tps']:.2f}" if e["ratio"] else "-",
                     f"{ours['ttft_s']:.3f}", f"{peer['ttft_s']:.3f}" if peer else "-",
                     f"{ours['peak_memory_bytes'] / 2**30:.2f}",
                     f"{peer['peak_memory_bytes'] / 2**30:.2f}" if peer else "-"])
    return "\n".join([f"{report['model']} on {report['device']} ({report['dtype']}), "
                      f"{report['gen_tokens']} generated tokens, median of {report['repeats']}",
                      format_table(head, rows)])


if __name__ == "__main__":
    main()
