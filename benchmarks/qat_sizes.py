"""Bytes of the three routes to a Gemma 3 QAT model, per size, from the real shapes.

    python benchmarks/qat_sizes.py [--json sizes.json]

Parameters are counted on the network built from `gemma_mlx.bench.shape_config` (REFERENCE.md's
shapes; nothing is allocated), the SigLIP tower and projector included for 4B, 12B and 27B.
Bytes per weight, by kind of tensor:

  route                                    linear layers          embedding       other floats
  mlx-community *-qat-4bit (MLX affine)    4 bits + bf16 scale    same as linear  bf16 (the
                                           and bias per 64                        vision tower too)
  Google's *-qat-q4_0-gguf + mmproj        Q4_0: 18 bytes per 32  F16             F32 norms; mmproj
                                                                                  F16 matrices, F32
                                                                                  vectors and
                                                                                  embeddings
    imported by the *-qat aliases          4 bits + f32 scale     F32             F32 norms; mmproj
                                           and bias per 32                        as stored
  convert --qat (unquantized bf16)         4 bits + f16 scale     bf16            bf16
                                           and bias per 32
    as gemma-mlx computes it               4 bits + f32 scale     F32             F32
                                           and bias per 32

"linear layers" are the decoder's 7 projections per layer; the vision tower stays in floats on
every route. Google's files hold the embedding in F16 (the stduhpf/*-qat-q4_0-gguf-small model
cards; their sizes, 1.0, 3.16, 8.07 and 17.2 GB, are this script's figures).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlx.utils import tree_flatten

from gemma_mlx.bench import VISION_SHAPES, shape_config
from gemma_mlx.model.gemma3 import Gemma3

SIZES = ("1b", "4b", "12b", "27b")


def parameter_counts(shape: str) -> dict[str, int]:
    """Weights by kind: decoder linear layers, embedding, decoder norms, and the vision tower's
    matrices (2-D and the conv) and vectors (biases, norms) and embeddings."""
    net = Gemma3(shape_config(shape, vision=shape in VISION_SHAPES))
    counts = dict.fromkeys(("linear", "embedding", "norms", "vision_matrices", "vision_vectors",
                            "vision_embeddings"), 0)
    for key, value in tree_flatten(net.parameters()):
        n = value.size
        if key.startswith(("vision_tower.", "multi_modal_projector.")):
            kind = ("vision_embeddings" if ".embeddings." in key and "patch_embedding.weight"
                    not in key else "vision_matrices" if value.ndim >= 2 else "vision_vectors")
        elif "embed_tokens" in key:
            kind = "embedding"
        elif value.ndim == 2:
            kind = "linear"
        else:
            kind = "norms"
        counts[kind] += n
    return counts


def route_bytes(c: dict[str, int]) -> dict[str, float]:
    vision_f32 = 4 * (c["vision_vectors"] + c["vision_embeddings"])
    mmproj = 2 * c["vision_matrices"] + vision_f32
    vision_bf16 = 2 * (c["vision_matrices"] + c["vision_vectors"] + c["vision_embeddings"])
    vision_f32_all = 2 * vision_bf16
    return {
        "mlx-community 4-bit g64": (c["linear"] + c["embedding"]) * (4 + 32 / 64) / 8
        + 2 * c["norms"] + vision_bf16,
        "Google GGUF": c["linear"] * 18 / 32 + 2 * c["embedding"] + 4 * c["norms"],
        "Google GGUF + mmproj (download)": c["linear"] * 18 / 32 + 2 * c["embedding"]
        + 4 * c["norms"] + mmproj,
        "Google GGUF, imported (*-qat alias)": c["linear"] * (4 + 64 / 32) / 8
        + 4 * c["embedding"] + 4 * c["norms"] + mmproj,
        "convert --qat (files)": c["linear"] * (4 + 32 / 32) / 8 + 2 * c["embedding"]
        + 2 * c["norms"] + vision_bf16,
        "convert --qat (in memory, float32)": c["linear"] * (4 + 64 / 32) / 8
        + 4 * c["embedding"] + 4 * c["norms"] + vision_f32_all,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    counts = {s: parameter_counts(s) for s in SIZES}
    table = {s: route_bytes(c) for s, c in counts.items()}
    routes = list(next(iter(table.values())))
    print("| route | " + " | ".join(s.upper() for s in SIZES) + " |")
    print("|---" * (len(SIZES) + 1) + "|")
    for route in routes:
        print(f"| {route} | " + " | ".join(f"{table[s][route] / 1e9:.2f} GB" for s in SIZES)
              + " |")
    report = {"parameters": counts, "bytes": table}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
