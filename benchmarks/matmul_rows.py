"""What one more batch row costs MLX's matmuls on this machine, beside NumPy's on the same data.

Continuous batching pays off where a decode step's cost is per step (kernel launches, reading
the weights), not per row. This times the matmuls of a step at 1..N rows: dense float32 (the
CPU's compute dtype) and 4-bit `quantized_matmul`, each beside NumPy's float32 matmul (an
optimized BLAS). Where MLX's time grows in proportion to the rows, batching cannot multiply
the aggregate tok/s, whatever the batch around it does.

    python benchmarks/matmul_rows.py --rows 1,2,4,8,16 --shape 64x1024 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform

import mlx.core as mx
import numpy as np
from batch_levers import timed  # median seconds after a warm-up


def timed_ms(fn, iters: int) -> float:
    return timed(fn, iters) * 1e3


def measure(rows: int, d_in: int, d_out: int, iters: int) -> dict[str, float]:
    x = mx.random.normal((rows, d_in))
    w = mx.random.normal((d_out, d_in))
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    mx.eval(x, w, wq, scales, biases)
    x_np, w_np = np.array(x), np.array(w)
    return {
        "rows": rows,
        "mlx_float32_ms": timed_ms(lambda: mx.eval(x @ w.T), iters),
        "mlx_4bit_ms": timed_ms(lambda: mx.eval(mx.quantized_matmul(
            x, wq, scales, biases, transpose=True, group_size=64, bits=4)), iters),
        "numpy_float32_ms": timed_ms(lambda: x_np @ w_np.T, iters),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--shape", default="64x1024", help="IN x OUT (default: the tiny "
                        "model's output head, 64 x 1024)")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    d_in, d_out = (int(v) for v in args.shape.split("x"))
    results = [measure(int(r), d_in, d_out, args.iters) for r in args.rows.split(",")]
    print(f"[rows, {d_in}] x [{d_in}, {d_out}] on {mx.default_device()}, median ms")
    print("rows  mlx float32  mlx 4-bit  numpy float32")
    for r in results:
        print(f"{r['rows']:>4}  {r['mlx_float32_ms']:>11.3f}  {r['mlx_4bit_ms']:>9.3f}  "
              f"{r['numpy_float32_ms']:>13.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(mx.default_device()), "mlx": mx.__version__,
                       "numpy": np.__version__, "machine": platform.processor() or
                       platform.machine(), "shape": [d_in, d_out], "results": results},
                      f, indent=1)


if __name__ == "__main__":
    main()
