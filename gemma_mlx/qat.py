"""llama.cpp's Q4_0 rule in MLX's format for Google's QAT checkpoints, and who wants it.

Google's `gemma-3-*-qat-q4_0-unquantized` checkpoints were trained so that llama.cpp's Q4_0
quantization of their weights keeps bfloat16 quality: that grid, not another one, is what QAT
bought. Per block of 32 weights (ggml's `quantize_row_q4_0_ref`, mirrored by gguf-py's
`gguf.quants.Q4_0`):

    max = the weight of largest magnitude, with its sign;  d = max / -8  (float32)
    q   = min(15, trunc(w * (1 / d) + 8.5))   (1 / d from the float32 d; 0 for an all-zero block)
    w'  = fp16(d) * (q - 8)

MLX's affine quantization at group size 32 holds that grid exactly: codes q, scale fp16(d) and
bias -8 fp16(d), both exact in float16 (an 11-bit d times 8) and in float32. The arithmetic runs
in numpy, op for op as gguf-py does it, so the codes and scales are gguf-py's own bit for bit.

Which tensors: the decoder's linear layers (what Google's `*-qat-q4_0-gguf` files hold as
Q4_0). The token embedding, which is also the output head, stays unquantized, as Google ships it
(F16 in those files); the vision tower stays in its own precision, as for every quantization here.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import BadCheckpoint

BITS = 4
GROUP_SIZE = 32
RULE = "q4_0"  # the config.json "quantization" entry of a folder on this grid says "rule": "q4_0"
_FP16_MAX = float(np.finfo(np.float16).max)
_CHUNK_WEIGHTS = 1 << 24  # rows are quantized in chunks of about this many weights
# Google's repos are named gemma-3-<size>-<it|pt>-qat-q4_0-unquantized (and -gguf)
_MARK = re.compile(r"qat[-_]?q4[-_]?0", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# The rule

def q4_0_codes(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 of a matrix [rows, cols] (cols a multiple of 32): the codes q (uint8, same shape) and
    the float16 scales d [rows, cols / 32], computed exactly as gguf-py's Q4_0.quantize_blocks."""
    rows, cols = w.shape
    blocks = np.asarray(w, dtype=np.float32).reshape(-1, GROUP_SIZE)
    imax = np.abs(blocks).argmax(axis=-1, keepdims=True)
    largest = np.take_along_axis(blocks, imax, axis=-1)
    d = largest / -8
    # weights Q4_0 cannot hold (inf, nan, |w| over 524032) warn here; quantize_q4_0 refuses them
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inverse = np.where(d == 0, 0, 1 / d)
        q = np.trunc((blocks * inverse) + np.float32(8.5), dtype=np.float32).astype(np.uint8)
        d16 = d.astype(np.float16)
    return q.clip(0, 15).reshape(rows, cols), d16.reshape(rows, -1)


def quantize_q4_0(w: mx.array | np.ndarray, name: str = "weight",
                  dtype: mx.Dtype = mx.float16) -> tuple[mx.array, mx.array, mx.array]:
    """A matrix on the Q4_0 grid in MLX's affine format: (packed uint32 weight, scales, biases)
    as `mx.quantize(w, group_size=32, bits=4)` lays them out, with scale d and bias -8d.
    `dtype` (float16 or float32) stores the scales and biases; float16 is exact unless |d| is
    over 8188 (then -8d overflows it, and float32 is used). Raises BadCheckpoint for weights that
    are not finite or too large for Q4_0's float16 scale."""
    from .gguf import pack

    rows, cols = w.shape
    step = max(1, _CHUNK_WEIGHTS // cols)
    codes, scales = [], []
    for start in range(0, rows, step):
        chunk = w[start:start + step]
        chunk = np.array(chunk.astype(mx.float32)) if isinstance(chunk, mx.array) else chunk
        q, d = q4_0_codes(chunk)
        if not np.isfinite(d).all():
            raise BadCheckpoint(f"{name} has weights that are not finite or too large for "
                                "Q4_0's float16 scale (|w| over 524032): the checkpoint is "
                                "damaged; download it again")
        codes.append(pack(q, BITS))
        scales.append(d)
    d = np.concatenate(scales).astype(np.float32)
    if np.abs(d).max(initial=0) * 8 > _FP16_MAX:
        dtype = mx.float32
    scale = mx.array(d).astype(dtype)
    return mx.array(np.concatenate(codes)), scale, (-8 * mx.array(d)).astype(dtype)


def quantize_layers(net: nn.Module, predicate: Callable[[str, nn.Module], bool]) -> dict:
    """Replace the linear layers `predicate` picks with QuantizedLinear on the Q4_0 grid. Scales
    and biases are float32 where the layer computed in float32 (lossless either way), else
    float16. Returns the config.json "quantization" entry."""
    originals: dict[str, mx.array] = {}

    def pick(path: str, module: nn.Module) -> bool:
        if isinstance(module, nn.Linear) and predicate(path, module):
            originals[path] = module.weight
            return True
        return False

    # MLX builds the quantized modules lazily: the min/max quantization it would compute is
    # replaced below before anything evaluates it.
    nn.quantize(net, group_size=GROUP_SIZE, bits=BITS, class_predicate=pick)
    for path in list(originals):
        weight = originals.pop(path)  # dropped as we go: the float layer's memory is freed
        dtype = mx.float32 if weight.dtype == mx.float32 else mx.float16
        packed, scales, biases = quantize_q4_0(weight, path, dtype)
        mx.eval(packed, scales, biases)
        net.load_weights([(f"{path}.weight", packed), (f"{path}.scales", scales),
                          (f"{path}.biases", biases)], strict=False)
    return {"group_size": GROUP_SIZE, "bits": BITS, "rule": RULE}


# ---------------------------------------------------------------------------------------------
# Which checkpoints are QAT for Q4_0, and which models are on its grid

def is_q4_0_qat(name: str | None, path: Path, config: dict[str, Any]) -> bool:
    """Whether a checkpoint says it was trained for Q4_0: its repo id or folder name (Google's
    `*-qat-q4_0-unquantized`, also as a Hub cache folder `models--google--...`), or its
    config's `_name_or_path`."""
    names = [name or "", path.name]
    if path.parent.name == "snapshots":  # huggingface_hub's cache: models--org--name/snapshots/x
        names.append(path.parent.parent.name)
    for section in (config, config.get("text_config") or {}):
        names += [str(section.get(k, "")) for k in ("_name_or_path", "name_or_path")]
    return any(_MARK.search(n) for n in names)


def on_q4_0_grid(net: nn.Module) -> bool:
    """Whether every quantized linear layer of the text decoder holds the Q4_0 grid (4 bits,
    groups of 32, bias = -8 scale): true of our Q4_0 quantization and of an imported Q4_0 GGUF."""
    found = False
    for path, module in net.named_modules():
        if not (path.startswith("language_model.") and isinstance(module, nn.QuantizedLinear)):
            continue
        if (module.bits, module.group_size) != (BITS, GROUP_SIZE) or \
                not mx.array_equal(module.biases, -8 * module.scales).item():
            return False
        found = True
    return found


def note(message: str) -> None:
    """A one-line note on stderr (the CLI's form, used by the library too)."""
    print(f"note: {message}", file=sys.stderr)
