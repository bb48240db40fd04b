"""Memory per rank of Gemma 3 12B and 27B split over several machines, from the real shapes.

    python benchmarks/distributed_memory.py [--context 32768] [--json out.json]

Each rank's network is built and split by the code that loads it (`distributed.Sharding`:
`plan`, `build`, and for tensor parallel `shard_block` on every block) with a stand-in group,
and its weights are counted from their shapes: nothing is allocated or read. Weights as the
mlx-community *-qat-4bit repos hold them (4-bit groups of 64 with bf16 scales and biases, the
embedding too; norms and the vision tower in bf16, the tower on rank 0). The KV cache is in
bf16 at `--context` tokens: global layers keep every token, sliding layers their window.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx

from gemma_mlx.bench import shape_config
from gemma_mlx.config import ModelConfig
from gemma_mlx.distributed import RankOf, Sharding, shard_block
from gemma_mlx.loading import QuantizeSpec, parameter_bytes, quantize_text_decoder

SHAPES = ("12b", "27b")
SPLITS = (("one machine", None, 1), ("tensor", "tensor", 2), ("tensor", "tensor", 4),
          ("pipeline", "pipeline", 2), ("pipeline", "pipeline", 4))


def rank_weights(config: ModelConfig, mode: str | None, rank: int, size: int) -> int:
    """Bytes of one rank's weights, laid out as the mlx-community 4-bit repos are."""
    sharding = Sharding.plan(mode, config, RankOf(rank, size)) if mode else None
    net = sharding.build(config) if sharding else None
    if net is None:
        from gemma_mlx.model.gemma3 import Gemma3

        net = Gemma3(config)
    net.set_dtype(mx.bfloat16)
    quantize_text_decoder(net, QuantizeSpec(4, 64))
    if sharding is not None and mode == "tensor":
        for block in net.decoder.layers:
            shard_block(block, config.text, sharding.group)
    return parameter_bytes(net)


def kv_bytes(config: ModelConfig, mode: str | None, rank: int, size: int, context: int) -> int:
    """This rank's bf16 KV cache at `context` tokens."""
    text = config.text
    layers = range(text.num_hidden_layers)
    if mode == "pipeline":
        layers = Sharding.plan(mode, config, RankOf(rank, size)).layers
    heads = text.num_key_value_heads
    if mode == "tensor":
        heads = max(1, heads // size)
    per_token = 2 * heads * text.head_dim * 2  # keys and values, bf16
    return sum(per_token * (min(context, text.sliding_window) if text.is_sliding(i) else context)
               for i in layers)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report: dict = {"context": args.context, "shapes": {}}
    gb = 1e9
    print(f"| model | split | ranks | weights per rank (GB) | KV cache at {args.context} tokens "
          "per rank (GB) |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        config = shape_config(shape, vision=True)
        rows = report["shapes"][shape] = []
        for name, mode, size in SPLITS:
            weights = [rank_weights(config, mode, r, size) for r in range(size)]
            kv = [kv_bytes(config, mode, r, size, args.context) for r in range(size)]
            rows.append({"split": name, "ranks": size, "weights_bytes": weights,
                         "kv_bytes": kv})
            print(f"| {shape.upper()} | {name} | {size} | "
                  f"{' / '.join(f'{w / gb:.2f}' for w in weights)} | "
                  f"{' / '.join(f'{k / gb:.2f}' for k in kv)} |")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
