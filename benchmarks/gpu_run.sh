#!/usr/bin/env bash
# The GPU runs behind benchmarks/RESULTS.md. MLX's CUDA backend must be importable first
# (on the lent H100: /work/shared/gpu/README.md). Writes JSON and a log under $OUT.
# SCRIPTS picks the parts (default: all), e.g. SCRIPTS="memory ttft context":
#   levers    benchmarks/decode_levers.py (4B)                          several minutes
#   bench     python -m gemma_mlx bench --compare mlx-lm, per SHAPES    several minutes
#   batching  decode levers under MLX's CUDA command-batching settings  a few minutes
#   memory    benchmarks/conversation_memory.py: 4B chat grown to 8K tokens, peak memory per
#             turn vs weights + KV; again with small CUDA command buffers, and with
#             1024-token messages                                      ~1-2 minutes
#   ttft      benchmarks/followup_ttft.py: follow-up TTFT per turn to 8K, with cache reuse
#             vs re-prefilling the conversation (ours, mlx-lm)          ~2 minutes
#   context   benchmarks/decode_vs_context.py: decode tok/s at CONTEXTS, ours vs mlx-lm
#                                                                       ~2 minutes
#   image     bench --image --compare mlx-vlm (4B with a random So400m tower), and the same
#             prompts without the image                                  a few minutes
#   kv        bench --kv-bits 8 at 32K and 128K (131000: room for the reply in the window),
#             --kv-bits 4 and --max-context 32768 at 128K,
#             each beside the full cache                                 several minutes
#   speculative  bench --draft-model beside plain decoding, 4B: a random 270M draft (next to
#             no drafts accepted: what a step costs) and the 4B as its own draft (every
#             draft accepted), DRAFT_TOKENS 2 3 4 at a time: with the two, the speed-up at
#             any acceptance rate follows                                ~10 minutes
#   constraint  bench --json-schema (records.json) beside plain decoding, 4B   ~1 minute
#   server    benchmarks/server_overhead.py: decode through the HTTP API vs the library, and
#             the follow-up time to first token of a 4K conversation, 4B   ~3 minutes
#   concurrency  bench --concurrency 1,4,8,16 --compare mlx-lm, 4B, 256+128 tokens, with
#             --dense-batch and without                                  ~5 minutes
#   batch_levers  benchmarks/batch_levers.py, 4B: one batched step at 1/4/8/16 rows, quantized
#             and dense, 512 and 128 slots                               ~1 minute
# Random shapes borrow a tokenizer for the constraint and the server: $TOKENIZER (a folder
# with the 270M's tokenizer files; default: the 270M package's).
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gemma-bench}
mkdir -p "$out"
scripts=" ${SCRIPTS:-levers bench batching memory ttft context} "
want() { [[ $scripts == *" $1 "* ]]; }
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import mlx.core as mx; print(mx.default_device(), mx.__version__)"
if want levers; then
python3 benchmarks/decode_levers.py --shape 4b --rounds 3 --chunks "${CHUNKS-512,1024,2048,4096}" \
  --json "$out/levers_4b.json"
fi
if want bench; then
for shape in ${SHAPES:-1b 4b}; do
  python3 -m gemma_mlx bench --random "$shape" --prompt-tokens 512,4096 --gen-tokens 128 \
    --repeats "${REPEATS:-3}" --compare mlx-lm --json >"$out/bench_$shape.json"
  python3 -c "import json, sys; from gemma_mlx.bench import table
print(table(json.load(open(sys.argv[1]))))" "$out/bench_$shape.json"
done
fi
# MLX's CUDA command batching, read once per process (H100 defaults: 30 ops, 400 MB)
if want batching; then
for ops_mb in ${BATCHING-100,2000 200,4000}; do
  MLX_MAX_OPS_PER_BUFFER=${ops_mb%,*} MLX_MAX_MB_PER_BUFFER=${ops_mb#*,} \
    python3 benchmarks/decode_levers.py --shape 4b --variants compiled,mlx-lm --chunks "" \
    --rounds 3 --no-check --json "$out/levers_4b_ops${ops_mb%,*}.json"
done
fi
if want memory; then
  python3 benchmarks/conversation_memory.py --shape 4b --context 8192 \
    --json "$out/conversation_memory_4b.json"
  # Buffers a CUDA command buffer's ops keep until it completes count in the peak: smaller ones
  MLX_MAX_OPS_PER_BUFFER=10 MLX_MAX_MB_PER_BUFFER=50 python3 benchmarks/conversation_memory.py \
    --shape 4b --context 8192 --json "$out/conversation_memory_4b_smallbuffers.json"
  # Longer messages: prefill activations grow with the new tokens (times the context)
  python3 benchmarks/conversation_memory.py --shape 4b --context 8192 --user-tokens 1024 \
    --json "$out/conversation_memory_4b_user1024.json"
fi
if want ttft; then
  python3 benchmarks/followup_ttft.py --shape 4b --context 8192 --repeats 3 \
    --json "$out/followup_ttft_4b.json"
fi
if want context; then
  python3 benchmarks/decode_vs_context.py --shape 4b \
    --contexts "${CONTEXTS-512,2048,8192,16384,32768}" --gen-tokens 128 --repeats 2 \
    --json "$out/decode_vs_context_4b.json"
fi
# show FILE [MODULE]: a bench JSON as a table (MODULE bench_concurrency for --concurrency)
show() { python3 -c "import json, sys; from gemma_mlx.${2:-bench} import table
print(table(json.load(open(sys.argv[1]))))" "$1"; }
if want image; then
  for image in --image ""; do
    name=bench_4b_mlx_vlm${image:+_image}
    python3 -m gemma_mlx bench --random 4b $image --compare mlx-vlm --prompt-tokens 512,4096 \
      --gen-tokens 64 --repeats "${REPEATS:-3}" --json >"$out/$name.json" && show "$out/$name.json"
  done
fi
if want kv; then
  for bound in "--kv-bits 8:32768,131000" "--kv-bits 4:131000" "--max-context 32768:131000"; do
    name=bench_4b_$(echo "${bound%:*}" | tr -d ' -')
    python3 -m gemma_mlx bench --random 4b ${bound%:*} --prompt-tokens "${bound#*:}" \
      --gen-tokens 32 --repeats 1 --json >"$out/$name.json" && show "$out/$name.json"
  done
fi
if want speculative; then
  for draft in 270m 4b; do
    for k in ${DRAFT_TOKENS-2 3 4}; do
      name=bench_4b_draft_${draft}_k$k
      python3 -m gemma_mlx bench --random 4b --draft-model "$draft" --num-draft-tokens "$k" \
        --prompt-tokens 512,4096 --gen-tokens 128 --repeats "${REPEATS:-3}" --json \
        >"$out/$name.json" && show "$out/$name.json"
    done
  done
fi
if want constraint; then
  GEMMA_MLX_BENCH_TOKENIZER=${TOKENIZER:-270m} python3 -m gemma_mlx bench --random 4b \
    --json-schema benchmarks/schemas/records.json --prompt-tokens 512 --gen-tokens 128 \
    --repeats "${REPEATS:-3}" --json >"$out/bench_4b_json_schema.json" \
    && show "$out/bench_4b_json_schema.json"
fi
if want server; then
  python3 benchmarks/server_overhead.py --random 4b --context 4096 --repeats "${REPEATS:-3}" \
    ${TOKENIZER:+--tokenizer "$TOKENIZER"} --json "$out/server_overhead_4b.json"
fi
if want concurrency; then
  for dense in --dense-batch ""; do
    name=concurrency_4b${dense:+_dense}
    python3 -m gemma_mlx bench --random 4b --concurrency 1,4,8,16 --compare mlx-lm $dense \
      --prompt-tokens 256 --gen-tokens 128 --repeats 2 --json >"$out/$name.json" \
      && show "$out/$name.json" bench_concurrency
  done
fi
if want batch_levers; then
  python3 benchmarks/batch_levers.py --shape 4b --rows 1,4,8,16 --json "$out/batch_levers_4b.json"
fi
} 2>&1 | tee "$out/run.log"
