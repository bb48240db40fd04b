#!/usr/bin/env bash
# The GPU runs behind benchmarks/RESULTS.md. MLX's CUDA backend must be importable first
# (on the lent H100: /work/shared/gpu/README.md). Writes JSON and a log under $OUT.
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gemma-bench}
mkdir -p "$out"
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import mlx.core as mx; print(mx.default_device(), mx.__version__)"
python3 benchmarks/decode_levers.py --shape 4b --rounds 3 --chunks "${CHUNKS-512,1024,2048,4096}" \
  --json "$out/levers_4b.json"
for shape in ${SHAPES:-1b 4b}; do
  python3 -m gemma_mlx bench --random "$shape" --prompt-tokens 512,4096 --gen-tokens 128 \
    --repeats "${REPEATS:-3}" --compare mlx-lm --json >"$out/bench_$shape.json"
  python3 -c "import json, sys; from gemma_mlx.bench import table
print(table(json.load(open(sys.argv[1]))))" "$out/bench_$shape.json"
done
# MLX's CUDA command batching, read once per process (H100 defaults: 30 ops, 400 MB)
for ops_mb in ${BATCHING-100,2000 200,4000}; do
  MLX_MAX_OPS_PER_BUFFER=${ops_mb%,*} MLX_MAX_MB_PER_BUFFER=${ops_mb#*,} \
    python3 benchmarks/decode_levers.py --shape 4b --variants compiled,mlx-lm --chunks "" \
    --rounds 3 --no-check --json "$out/levers_4b_ops${ops_mb%,*}.json"
done
} 2>&1 | tee "$out/run.log"
