"""What a batched decode step costs, piece by piece (a measurement script, run by hand).

For B rows of a random real-shape model: the whole compiled step (one shared timeline slot,
written in place; over the quantized weights and over their dense copies, `--dense-batch`;
global layers of 512 slots and of 128), and an MLP's 4-bit matmuls alone at those B (rows
apart, [B, 1, hidden], and as one sequence, [1, B, hidden]), beside the same matmul on the
weights dequantized to bfloat16. Timings are medians of `--iters`
steps after a warm-up.

    python benchmarks/batch_levers.py --shape 4b --rows 1,8,16 --json out.json
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

from gemma_mlx.bench import random_model  # noqa: E402
from gemma_mlx.model import decode  # noqa: E402


def buffers(cfg, rows: int, capacity: int, dtype) -> list[mx.array]:
    out = []
    for i in range(cfg.num_hidden_layers):
        slots = cfg.sliding_window if cfg.is_sliding(i) else capacity
        out += [mx.zeros((rows, cfg.num_key_value_heads, slots, cfg.head_dim), dtype)] * 2
    return out


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_time(model, rows: int, iters: int, capacity: int = 512, dense: bool = False) -> float:
    program = decode.decode_program(model.net.decoder, dense=dense)
    cfg = model.config.text
    program.set_quantized([None] * cfg.num_hidden_layers)
    dtype = model.net.decoder.embed_tokens.scales.dtype
    state = {"b": buffers(cfg, rows, capacity, dtype)}
    tokens = mx.zeros((rows,), mx.uint32)
    starts = mx.array([r for r in range(rows)], dtype=mx.int32)
    now = mx.array(300, dtype=mx.int32)

    def one():
        logits, state["b"], _ = program.step_rows(tokens, now, starts, state["b"])
        mx.eval(logits, state["b"])

    return timed(one, iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4b")
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    model = random_model(args.shape)
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        entry = {"rows": rows, "step_ms": 1e3 * step_time(model, rows, args.iters),
                 "step_dense_ms": 1e3 * step_time(model, rows, args.iters, dense=True),
                 "step_128_slots_ms": 1e3 * step_time(model, rows, args.iters, capacity=128)}
        mlp = model.net.decoder.layers[0].mlp
        cfg = model.config.text
        x = mx.random.normal((rows, 1, cfg.hidden_size)).astype(mx.bfloat16)
        y = mx.random.normal((rows, 1, cfg.intermediate_size)).astype(mx.bfloat16)
        entry["mlp_gate_ms"] = 1e3 * timed(lambda m=mlp, x=x: mx.eval(m.gate_proj(x)), args.iters)
        entry["mlp_down_ms"] = 1e3 * timed(lambda m=mlp, y=y: mx.eval(m.down_proj(y)), args.iters)
        # the same rows as one sequence [1, B, hidden], as the step lays them out
        flat = x.reshape(1, rows, -1)
        entry["mlp_gate_one_sequence_ms"] = 1e3 * timed(
            lambda m=mlp, x=flat: mx.eval(m.gate_proj(x)), args.iters)
        gate = mlp.gate_proj
        dense = mx.dequantize(gate.weight, gate.scales, gate.biases, gate.group_size,
                              gate.bits).astype(mx.bfloat16)
        mx.eval(dense)
        entry["mlp_gate_dense_bf16_ms"] = 1e3 * timed(lambda w=dense, x=x: mx.eval(x @ w.T),
                                                      args.iters)
        print(json.dumps(entry), flush=True)
        results.append(entry)
    report = {"model": model.description, "device": str(mx.default_device()),
              "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
