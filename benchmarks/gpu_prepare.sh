#!/usr/bin/env bash
# Packs what benchmarks/gpu_run.sh needs on the lent GPU machine, beyond MLX's CUDA backend:
# the server's and the constraint's wheels, and the 270M's tokenizer (random shapes borrow it).
# Run from the project's root, with the virtualenv active (the 270M imported once). Then:
#   call 1, carrying .gpu/a: mkdir -p /root/mlxcuda /root/tok && cp .gpu/a/part.aa /root/mlxcuda/
#            && xz -dc .gpu/a/tok.tar.xz | tar x -C /root/tok
#   call 2, carrying .gpu/b: the install line of ../shared/gpu/README.md, then
#            TOKENIZER=/root/tok SCRIPTS="constraint server concurrency" OUT=$OUT bash benchmarks/gpu_run.sh
set -euo pipefail
versions() { python -c "import importlib.metadata as m, sys
print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" "$@"; }
bash ../shared/gpu/prepare.sh $(versions mlx-lm fastapi starlette uvicorn sse-starlette pydantic \
  pydantic_core annotated-types annotated-doc typing-inspection prometheus_client httpx httpcore \
  h11 anyio sniffio idna certifi click typing_extensions gguf jsonschema opentelemetry-api \
  jsonschema-specifications referencing rpds-py attrs)
# llguidance ships manylinux_2_31 wheels, which prepare.sh's platform list does not take
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_31_x86_64 -d .gpu/b "$(versions llguidance)"
tokenizer=$(python -c "from gemma_mlx.hub import resolve; print(resolve('270m'))")
tar cf - -C "$tokenizer" tokenizer.json tokenizer_config.json special_tokens_map.json \
  | xz -T0 -9 > .gpu/a/tok.tar.xz
du -sh .gpu/a .gpu/b
