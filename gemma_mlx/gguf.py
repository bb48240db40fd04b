"""Import a Gemma 3 GGUF (llama.cpp's format) into a model folder in mlx-lm's gemma3_text layout.

Most ggml block formats are affine over 32 weights (w = scale * q + bias), which is exactly MLX's
affine quantization at group size 32: those blocks are repacked, not re-quantized, so the imported
model multiplies by the very weights llama.cpp does. Formats that do not fit (Q6_K's 16-weight
sub-blocks, the IQ codebooks) are dequantized and re-quantized to 8 bits, group 32.

    import_gguf("gemma-3-270m-q4_k_m.gguf", "models/270m")    # then mlx_lm.load("models/270m")

With llama.cpp's vision projector file (an "mmproj" GGUF) the folder is a whole multimodal model
in mlx-vlm's layout instead (`language_model.*`, `vision_tower.*`, `multi_modal_projector.*`):

    import_gguf("gemma-3-4b-it-q4_0.gguf", "models/4b", mmproj="mmproj-model-f16.gguf")

The file is read with our own header parser over a memory map: `gguf.GGUFReader` builds Python
objects for each of the 262k vocabulary entries and takes ~10 s on the 270M before any work.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from math import prod
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from .errors import BadCheckpoint
from .qat import RULE
from .safetensors_out import write_safetensors

Q = GGMLQuantizationType
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
# float32: mlx-lm computes in the dtype of the scales; in float32 the import is bit-exact and
# scores llama.cpp's perplexity, bfloat16 compute costs ~4.7% perplexity on the 270M (and is ~12x
# slower on MLX's CPU backend). Storing bf16/fp16 scales but computing in float32 costs only
# 0.06%/0.01% (benchmarks/RESULTS.md), so a loader may downcast the stored scales to save memory.
DEFAULT_DTYPE = "float32"
GROUP_SIZE = 32  # every exact block format is affine per 32 weights (K-quants per sub-block)
REQUANT_BITS = 8  # for block formats MLX cannot hold: ~0.5% relative RMS error at group 32
_CHUNK_WEIGHTS = 1 << 24  # rows are converted in chunks of about this many weights, to bound memory


# ---------------------------------------------------------------------------------------------
# Reading the file

@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: its raw bytes as rows, so block formats are decoded without copying the file."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: (rows, cols) for a matrix
    raw: np.ndarray  # uint8, (rows, bytes per row), a view of the memory-mapped file


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads GGUF's little-endian header fields in order; a read past the end means truncation."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise BadCheckpoint(f"{self.path}: truncated or corrupt GGUF header (a field at byte "
                                f"{start} runs past the end of the {len(self.buf)}-byte file)")
        self.pos += n
        return start

    def scalar(self, vtype: int) -> Any:
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar(10)
        start = self.take(n)
        return self.buf[start:start + n].decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.scalar(4), self.scalar(10)
            if item_type in _SCALARS:  # numbers in bulk: one numpy read, not `count` unpacks
                dtype = np.dtype(_SCALARS[item_type].replace("?", "b1"))
                start = self.take(count * dtype.itemsize)
                return np.frombuffer(self.buf, dtype, count, start).copy()
            if count > len(self.buf) - self.pos:  # each item takes at least a byte
                raise BadCheckpoint(f"{self.path}: truncated or corrupt GGUF header (an array "
                                    f"of {count} items is longer than the file)")
            return [self.value(item_type) for _ in range(count)]
        if vtype in _SCALARS:
            return self.scalar(vtype)
        raise BadCheckpoint(f"{self.path}: truncated or corrupt GGUF header (unknown value "
                            f"type {vtype})")


def read_gguf(path: str | Path) -> GGUFFile:
    """Metadata and tensor views of a GGUF file; BadCheckpoint if it is not a whole GGUF."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError as e:  # mmap refuses an empty file
        raise BadCheckpoint(f"{path}: empty file, not a GGUF") from e
    if buf[:4] != b"GGUF":
        raise BadCheckpoint(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        return _parse(_Cursor(buf, path))
    except (struct.error, UnicodeDecodeError, ValueError, KeyError) as e:
        raise BadCheckpoint(f"{path}: truncated or corrupt GGUF header ({e})") from e


def _parse(cur: _Cursor) -> GGUFFile:
    cur.take(4)
    version = cur.scalar(4)
    if version not in (2, 3):  # a big-endian file reads as a huge version
        raise BadCheckpoint(f"{cur.path}: GGUF version {version} is not supported (only 2 and 3, "
                            "little-endian)")
    n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar(4))
    infos = [_tensor_info(cur) for _ in range(n_tensors)]
    align = int(metadata.get("general.alignment", 32))
    data_start = -(-cur.pos // align) * align
    tensors = {info[0]: _tensor(cur, data_start, *info) for info in infos}
    return GGUFFile(cur.path, metadata, tensors)


def _tensor_info(cur: _Cursor) -> tuple[str, list[int], GGMLQuantizationType, int]:
    name = cur.string()
    n_dims = cur.scalar(4)
    if not 1 <= n_dims <= 4:
        raise BadCheckpoint(f"{cur.path}: truncated or corrupt GGUF header (tensor {name} has "
                            f"{n_dims} dimensions)")
    dims = [cur.scalar(10) for _ in range(n_dims)]
    qtype = cur.scalar(4)
    try:
        qtype = Q(qtype)
    except ValueError as e:
        raise BadCheckpoint(f"{cur.path}: tensor {name} has unknown ggml type {qtype}") from e
    return name, dims, qtype, cur.scalar(10)


def _tensor(cur: _Cursor, data_start: int, name: str, dims: list[int],
            qtype: GGMLQuantizationType, offset: int) -> GGUFTensor:
    block, type_size = GGML_QUANT_SIZES[qtype]
    cols, rows = dims[0], prod(dims[1:])  # ggml lists the fastest-varying dimension first
    if cols % block:
        raise BadCheckpoint(f"{cur.path}: tensor {name} has {cols} columns, not a multiple of "
                            f"the {qtype.name} block size {block}")
    row_bytes = cols // block * type_size
    start, size = data_start + offset, rows * row_bytes
    if start + size > len(cur.buf):
        raise BadCheckpoint(f"{cur.path}: truncated GGUF: tensor {name} ends at byte "
                            f"{start + size} but the file has {len(cur.buf)} bytes")
    raw = np.frombuffer(cur.buf, np.uint8, size, start).reshape(rows, row_bytes)
    return GGUFTensor(name, qtype, tuple(reversed(dims)), raw)


# ---------------------------------------------------------------------------------------------
# Block formats that are MLX affine quantization at group size 32
#
# Each decoder takes blocks (n, type size) and returns the unsigned codes q (n, block size) and
# the scales and biases (n, block size / 32) with w = scale * q + bias, in float32, computed as
# ggml does so that the products are exact.

Decoded = tuple[np.ndarray, np.ndarray, np.ndarray]


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of each block, as float32 (n, 1)."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """4-bit codes: ggml stores `width` weights in the low nibbles, then the next `width` high."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, width)
    return np.concatenate([qs & 15, qs >> 4], axis=2).reshape(n, -1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit i of the little-endian 32-bit qh is the fifth bit of weight i."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _q8_0(b: np.ndarray) -> Decoded:
    d = _f16(b, 0)
    q = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # MLX codes are unsigned
    return q, d, -128 * d


def _q4_0(b: np.ndarray) -> Decoded:
    d = _f16(b, 0)
    return _nibbles(b[:, 2:], 16), d, -8 * d


def _q4_1(b: np.ndarray) -> Decoded:
    return _nibbles(b[:, 4:], 16), _f16(b, 0), _f16(b, 2)


def _q5_0(b: np.ndarray) -> Decoded:
    d = _f16(b, 0)
    return _nibbles(b[:, 6:], 16) | _high_bits(b[:, 2:6]) << 4, d, -16 * d


def _q5_1(b: np.ndarray) -> Decoded:
    return _nibbles(b[:, 8:], 16) | _high_bits(b[:, 4:8]) << 4, _f16(b, 0), _f16(b, 2)


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """K-quant super-block header: fp16 d and dmin, then 8 six-bit scales and mins in 12 bytes
    (ggml's get_scale_min_k4). Sub-block j has scale d * sc[j] and bias -dmin * m[j]."""
    s = b[:, 4:16].reshape(-1, 3, 4)
    lo_sc, lo_m, hi = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([lo_sc & 63, (hi & 15) | (lo_sc >> 6) << 4], axis=1)
    m = np.concatenate([lo_m & 63, (hi >> 4) | (lo_m >> 6) << 4], axis=1)
    return _f16(b, 0) * sc.astype(np.float32), -(_f16(b, 2) * m.astype(np.float32))


def _q4_k(b: np.ndarray) -> Decoded:
    scales, biases = _k_scales(b)
    return _nibbles(b[:, 16:], 32), scales, biases


def _q5_k(b: np.ndarray) -> Decoded:
    scales, biases = _k_scales(b)
    qh = b[:, 16:48]  # bit j of qh[l] is the fifth bit of weight l of sub-block j
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    return _nibbles(b[:, 48:], 32) | high.reshape(len(b), -1) << 4, scales, biases


EXACT_FORMATS: dict[GGMLQuantizationType, tuple[int, Callable[[np.ndarray], Decoded]]] = {
    Q.Q4_0: (4, _q4_0), Q.Q4_1: (4, _q4_1), Q.Q5_0: (5, _q5_0), Q.Q5_1: (5, _q5_1),
    Q.Q8_0: (8, _q8_0), Q.Q4_K: (4, _q4_k), Q.Q5_K: (5, _q5_k),
}
FLOAT_FORMATS = (Q.F32, Q.F16, Q.BF16)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing: the codes of a row as one little-endian bit stream, read as uint32."""
    rows, cols = q.shape
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8).view(np.uint32)
    eight = q.reshape(rows, cols // 8, 8).astype(np.uint64)  # 8 codes fill exactly `bits` bytes
    stream = (eight << (np.arange(8, dtype=np.uint64) * bits)).sum(axis=-1, dtype=np.uint64)
    stream = stream.view(np.uint8).reshape(rows, cols // 8, 8)[..., :bits]
    return np.ascontiguousarray(stream).reshape(rows, -1).view(np.uint32)


# ---------------------------------------------------------------------------------------------
# Tensors to mlx-lm weights

@dataclass(frozen=True)
class Quantized:
    """A matrix in MLX's affine format (`mx.quantize` layout), scales and biases in float32."""

    weight: np.ndarray  # uint32, (rows, cols * bits / 32)
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int = GROUP_SIZE


def quantized(tensor: GGUFTensor) -> Quantized:
    """A block-format matrix in MLX's format: repacked where exact, else re-quantized."""
    rows_per_chunk = max(1, _CHUNK_WEIGHTS // tensor.shape[-1])
    parts = [_convert_rows(tensor, tensor.raw[i:i + rows_per_chunk])
             for i in range(0, tensor.raw.shape[0], rows_per_chunk)]
    weight, scales, biases = (np.concatenate(p) for p in zip(*parts, strict=True))
    bits = EXACT_FORMATS[tensor.qtype][0] if tensor.qtype in EXACT_FORMATS else REQUANT_BITS
    return Quantized(weight, scales, biases, bits)


def _convert_rows(tensor: GGUFTensor, raw: np.ndarray) -> Decoded:
    rows = raw.shape[0]
    if tensor.qtype in EXACT_FORMATS:
        bits, decode = EXACT_FORMATS[tensor.qtype]
        q, scales, biases = decode(raw.reshape(-1, GGML_QUANT_SIZES[tensor.qtype][1]))
        return pack(q.reshape(rows, -1), bits), scales.reshape(rows, -1), biases.reshape(rows, -1)
    w = mx.array(dequantize(raw, tensor.qtype))
    weight, scales, biases = mx.quantize(w, group_size=GROUP_SIZE, bits=REQUANT_BITS)
    return np.array(weight), np.array(scales), np.array(biases)


def to_float32(tensor: GGUFTensor) -> np.ndarray:
    """A tensor as float32 (exact for F32/F16/BF16 and for gguf's dequantization of blocks)."""
    raw = np.ascontiguousarray(tensor.raw)
    if tensor.qtype not in FLOAT_FORMATS:
        values = dequantize(raw, tensor.qtype)
    elif tensor.qtype == Q.F32:
        values = raw.view(np.float32)
    elif tensor.qtype == Q.F16:
        values = raw.view(np.float16).astype(np.float32)
    else:  # bf16 is the top half of a float32
        values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return values.reshape(tensor.shape)


_LAYER_MODULES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_MODULES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                "output": "lm_head"}


def module_path(gguf_name: str) -> str | None:
    """The mlx-lm module a GGUF tensor belongs to (`blk.3.attn_q.weight` ->
    `model.layers.3.self_attn.q_proj`), or None if Gemma 3 has no such tensor."""
    base, _, kind = gguf_name.rpartition(".")
    if kind != "weight":
        return None
    if base in _TOP_MODULES:
        return _TOP_MODULES[base]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m[2] in _LAYER_MODULES:
        return f"model.layers.{m[1]}.{_LAYER_MODULES[m[2]]}"
    return None


def _module_plan(gguf: GGUFFile, n_layers: int) -> dict[str, GGUFTensor]:
    """module path -> tensor, checked complete before anything is written."""
    plan = {}
    for name, tensor in gguf.tensors.items():
        path = module_path(name)
        if path is None or (path.startswith("model.layers.") and
                            int(path.split(".")[2]) >= n_layers):
            raise BadCheckpoint(f"{gguf.path}: unexpected tensor {name} for a {n_layers}-layer "
                                "Gemma 3")
        plan[path] = tensor
    expected = ["model.embed_tokens", "model.norm"] + [
        f"model.layers.{i}.{m}" for i in range(n_layers) for m in _LAYER_MODULES.values()]
    missing = [p for p in expected if p not in plan]
    if missing:
        raise BadCheckpoint(f"{gguf.path}: GGUF lacks the tensor for {missing[0]} "
                            f"({len(missing)} missing)")
    return plan


Setting = tuple[int, int]  # (group_size, bits) of a quantized module


def module_weights(path: str, tensor: GGUFTensor,
                   dtype: mx.Dtype) -> tuple[dict[str, mx.array], Setting | None]:
    """The safetensors entries of one module, and its (group_size, bits) if quantized."""
    if path.endswith("norm"):
        # llama.cpp's converter stores Gemma's RMSNorm weights with the model's +1 added;
        # the HF convention (and mlx-lm) compute x * (1 + w): subtract it again in float32,
        # as transformers' GGUF loader does. Exact: the originals are bf16.
        return {f"{path}.weight": mx.array(to_float32(tensor) - 1).astype(dtype)}, None
    if tensor.qtype in FLOAT_FORMATS:
        return {f"{path}.weight": mx.array(to_float32(tensor)).astype(dtype)}, None
    q = quantized(tensor)
    return {f"{path}.weight": mx.array(q.weight),
            f"{path}.scales": mx.array(q.scales).astype(dtype),
            f"{path}.biases": mx.array(q.biases).astype(dtype)}, (q.group_size, q.bits)


# ---------------------------------------------------------------------------------------------
# config.json

def _meta(gguf: GGUFFile, key: str) -> Any:
    try:
        value = gguf.metadata[key]
    except KeyError:
        raise BadCheckpoint(f"{gguf.path}: GGUF metadata lacks {key}") from None
    return value


def _f32(x: float) -> float:
    """A float32 metadata value as its shortest decimal (1e-06, not 9.999999974752427e-07)."""
    return float(str(np.float32(x)))


def text_config(gguf: GGUFFile, vocab_size: int, tied: bool, dtype: str) -> dict[str, Any]:
    """The HF Gemma 3 text config (original style), from the `gemma3.*` metadata.

    What the metadata does not state is what llama.cpp hardcodes for gemma3: sliding window
    pattern 6, local RoPE base 10000, and the query scale rule below.
    """
    def key(k: str) -> Any:
        return _meta(gguf, f"gemma3.{k}")

    hidden, heads = key("embedding_length"), key("attention.head_count")
    layers = key("block_count")
    head_dim = gguf.metadata.get("gemma3.attention.key_length", hidden // heads)
    tokens = _meta(gguf, "tokenizer.ggml.tokens")
    eos = gguf.metadata.get("tokenizer.ggml.eos_token_id", 1)
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv"),
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "sliding_window": key("attention.sliding_window"),
        "sliding_window_pattern": 6,
        "rope_theta": _f32(key("rope.freq_base")),
        "rope_local_base_freq": 10000.0,
        "rope_scaling": _rope_scaling(gguf),
        # llama.cpp: the 27B (62 layers) scales queries by (hidden / heads) ** -0.5 = 168 ** -0.5,
        # the others by head_dim ** -0.5. (transformers' GGUF loader keeps its default 256.)
        "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
        "max_position_embeddings": key("context_length"),
        "hidden_activation": "gelu_pytorch_tanh",
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "bos_token_id": gguf.metadata.get("tokenizer.ggml.bos_token_id", 2),
        "eos_token_id": _stop_ids(tokens, eos),
        "pad_token_id": gguf.metadata.get("tokenizer.ggml.padding_token_id", 0),
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
    }


def _rope_scaling(gguf: GGUFFile) -> dict[str, Any] | None:
    """Linear x8 on the global layers of 4B+ (llama.cpp writes rope.scaling.*), else None."""
    factor = gguf.metadata.get("gemma3.rope.scaling.factor",
                               gguf.metadata.get("gemma3.rope.scale_linear"))
    kind = gguf.metadata.get("gemma3.rope.scaling.type", "linear")
    if factor is None or kind == "none" or float(factor) in (0.0, 1.0):
        return None
    return {"rope_type": kind, "factor": _f32(factor)}


def _stop_ids(tokens: list[str], eos: int) -> list[int]:
    """<eos>, and <end_of_turn> that ends a chat turn (Gemma's generation_config stops on both)."""
    ids = [eos]
    if "<end_of_turn>" in tokens:
        ids.append(tokens.index("<end_of_turn>"))
    return ids


def _on_q4_0_grid(plan: dict[str, GGUFTensor]) -> bool:
    """Whether every linear layer of the decoder is Q4_0 (Google's QAT files): the folder then
    says so, as `convert --qat` writes it ("rule": "q4_0")."""
    linear = [t.qtype for p, t in plan.items()
              if ".layers." in p and not p.endswith("norm") and not p.startswith(_VISION)]
    return bool(linear) and all(q == Q.Q4_0 for q in linear)


def _quantization(modules: dict[str, Setting]) -> dict[str, Any]:
    """mlx-lm's quantization entry: the commonest setting on top, and each module's own."""
    group_size, bits = Counter(modules.values()).most_common(1)[0][0]
    per_module = {p: {"group_size": g, "bits": b} for p, (g, b) in modules.items()}
    return {"group_size": group_size, "bits": bits, **per_module}


# ---------------------------------------------------------------------------------------------
# The vision tower and projector: llama.cpp's "mmproj" GGUF
#
# llama.cpp keeps Gemma 3's SigLIP tower and projector in a file of their own (general.architecture
# "clip", projector type "gemma3" under clip.projector_type or clip.vision.projector_type),
# written by convert_hf_to_gguf.py --mmproj (class Gemma3VisionModel) or, before it, by
# examples/llava/gemma3_convert_encoder_to_gguf.py. The tensors keep transformers' layouts: the
# patch conv is torch's [out, in, kh, kw] and mm.input_projection.weight is
# mm_input_projection_weight [vision hidden, text hidden] as it is (clip.cpp multiplies by its
# transpose in ggml's dimension order, which is x @ W). Two conventions are undone here:
# mm.soft_emb_norm.weight holds Gemma's 1 + w (the SigLIP LayerNorms are stored as they are), and
# the older script named fc1 `ffn_down` and fc2 `ffn_up`; clip.cpp swaps them back when ffn_down
# takes the embedding width as input (`is_ffn_swapped`), and so do we.

_VISION = "vision_tower.vision_model."
_PROJECTOR = "multi_modal_projector."
_INPUT_PROJECTION = _PROJECTOR + "mm_input_projection_weight"
_SOFT_EMB_NORM = _PROJECTOR + "mm_soft_emb_norm.weight"
_PATCH_CONV = _VISION + "embeddings.patch_embedding.weight"
_VISION_TOP = {"v.patch_embd": _VISION + "embeddings.patch_embedding",
               "v.position_embd": _VISION + "embeddings.position_embedding",
               "v.post_ln": _VISION + "post_layernorm",
               "mm.soft_emb_norm": _PROJECTOR + "mm_soft_emb_norm"}
_VISION_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj", "attn_out": "self_attn.out_proj",
                 "ln1": "layer_norm1", "ln2": "layer_norm2", "ffn_up": "mlp.fc1",
                 "ffn_down": "mlp.fc2"}
_VISION_LINEAR = ("_proj", ".fc1", ".fc2")  # modules whose block-format weights stay quantized
PROJECTOR_SCALE = 4  # clip.cpp's default pooling for gemma3: 64x64 patches -> 16x16 soft tokens


def read_mmproj(path: str | Path) -> GGUFFile:
    """A Gemma 3 vision projector GGUF; BadCheckpoint for anything else."""
    mmproj = read_gguf(path)
    arch = mmproj.metadata.get("general.architecture")
    if arch != "clip":
        raise BadCheckpoint(f"{mmproj.path}: not a vision projector (mmproj) GGUF: its "
                            f"architecture is {arch!r}, not 'clip'; give the mmproj file "
                            "shipped with the model")
    kind = mmproj.metadata.get("clip.vision.projector_type",
                               mmproj.metadata.get("clip.projector_type"))
    if kind != "gemma3":
        raise BadCheckpoint(f"{mmproj.path}: projector type {kind!r} is not Gemma 3's "
                            "('gemma3'): give the mmproj file made for this Gemma 3 model")
    for key in ("clip.vision.image_mean", "clip.vision.image_std"):
        values = mmproj.metadata.get(key)
        if values is not None and not np.allclose(np.asarray(values, np.float64), 0.5):
            raise BadCheckpoint(f"{mmproj.path}: {key} is {list(np.asarray(values))}, but Gemma 3 "
                                "normalizes images with 0.5: not a Gemma 3 projector")
    return mmproj


def vision_config(mmproj: GGUFFile) -> tuple[dict[str, Any], int]:
    """The HF SigLIP vision config from `clip.vision.*`, and the soft tokens per image."""
    def key(k: str) -> int:
        return int(_meta(mmproj, f"clip.vision.{k}"))

    size, patch = key("image_size"), key("patch_size")
    scale = int(mmproj.metadata.get("clip.vision.projector.scale_factor", PROJECTOR_SCALE))
    per_side = size // patch // max(scale, 1)
    if per_side < 1:
        raise BadCheckpoint(f"{mmproj.path}: {size}px images in {patch}px patches pooled by "
                            f"{scale} leave no soft tokens")
    eps = mmproj.metadata.get("clip.vision.attention.layer_norm_epsilon", 1e-6)
    config = {"model_type": "siglip_vision_model", "hidden_size": key("embedding_length"),
              "intermediate_size": key("feed_forward_length"),
              "num_hidden_layers": key("block_count"),
              "num_attention_heads": key("attention.head_count"), "image_size": size,
              "patch_size": patch, "num_channels": 3, "layer_norm_eps": _f32(eps),
              "vision_use_head": False}
    return config, per_side * per_side


def vision_key(gguf_name: str, n_layers: int) -> str | None:
    """Our parameter name for an mmproj tensor (`v.blk.3.attn_q.bias` ->
    `vision_tower.vision_model.encoder.layers.3.self_attn.q_proj.bias`), or None."""
    if gguf_name == "mm.input_projection.weight":
        return _INPUT_PROJECTION
    base, _, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if base in _VISION_TOP:
        return f"{_VISION_TOP[base]}.{kind}"
    m = re.fullmatch(r"v\.blk\.(\d+)\.(\w+)", base)
    if m and m[2] in _VISION_LAYER and int(m[1]) < n_layers:
        return f"{_VISION}encoder.layers.{m[1]}.{_VISION_LAYER[m[2]]}.{kind}"
    return None


def _vision_shapes(config: dict[str, Any], text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Every parameter of the tower and projector, with its shape in numpy order as the mmproj
    stores it (the patch conv in torch's layout)."""
    d, f, p = config["hidden_size"], config["intermediate_size"], config["patch_size"]
    positions = (config["image_size"] // p) ** 2
    shapes = {_PATCH_CONV: (d, config["num_channels"], p, p),
              _VISION + "embeddings.patch_embedding.bias": (d,),
              _VISION + "embeddings.position_embedding.weight": (positions, d),
              _VISION + "post_layernorm.weight": (d,), _VISION + "post_layernorm.bias": (d,),
              _INPUT_PROJECTION: (d, text_hidden), _SOFT_EMB_NORM: (d,)}
    layer = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
             "self_attn.out_proj": (d, d), "layer_norm1": None, "layer_norm2": None,
             "mlp.fc1": (f, d), "mlp.fc2": (d, f)}
    for i in range(config["num_hidden_layers"]):
        for module, weight in layer.items():
            path = f"{_VISION}encoder.layers.{i}.{module}"
            shapes[f"{path}.weight"] = weight or (d,)
            shapes[f"{path}.bias"] = (weight or (d,))[:1]
    return shapes


def vision_plan(mmproj: GGUFFile, config: dict[str, Any],
                text_hidden: int) -> dict[str, GGUFTensor]:
    """parameter name -> tensor for the whole tower and projector, checked complete and of the
    right shapes (the projection's width against the text model's) before anything is written."""
    n_layers = config["num_hidden_layers"]
    plan = {}
    for name, tensor in mmproj.tensors.items():
        key = vision_key(name, n_layers)
        if key is None:
            raise BadCheckpoint(f"{mmproj.path}: unexpected tensor {name} for a {n_layers}-layer "
                                "Gemma 3 vision tower")
        plan[key] = tensor
    width = plan[_INPUT_PROJECTION].shape[-1] if _INPUT_PROJECTION in plan else \
        mmproj.metadata.get("clip.vision.projection_dim", text_hidden)
    if width != text_hidden:
        raise BadCheckpoint(f"{mmproj.path}: the projector maps images to width {width}, but the "
                            f"text model's hidden size is {text_hidden}: give the mmproj file "
                            "made for this model")
    _unswap_ffn(plan, config)
    expected = _vision_shapes(config, text_hidden)
    missing = [k for k in expected if k not in plan]
    if missing:
        raise BadCheckpoint(f"{mmproj.path}: mmproj lacks the tensor for {missing[0]} "
                            f"({len(missing)} missing)")
    for key, shape in expected.items():
        tensor = plan[key]
        if tensor.shape != shape and not (len(shape) == 1 and prod(tensor.shape) == shape[0]):
            raise BadCheckpoint(f"{mmproj.path}: tensor {tensor.name} has shape "
                                f"{list(tensor.shape)}, not {list(shape)} as its metadata says")
        plan[key] = replace(tensor, shape=shape)  # a bias stored as [1, 1, d] becomes [d]
    return plan


def _unswap_ffn(plan: dict[str, GGUFTensor], config: dict[str, Any]) -> None:
    """Files from the older script hold fc1 as ffn_down and fc2 as ffn_up: when "ffn_down" takes
    the embedding width as input, it is fc1 (clip.cpp's rule)."""
    for i in range(config["num_hidden_layers"]):
        fc1, fc2 = (f"{_VISION}encoder.layers.{i}.mlp.{m}" for m in ("fc1", "fc2"))
        down = plan.get(f"{fc2}.weight")
        if f"{fc1}.weight" in plan and down is not None and \
                down.shape[-1] == config["hidden_size"] != config["intermediate_size"]:
            for kind in ("weight", "bias"):
                a, b = plan.pop(f"{fc1}.{kind}", None), plan.pop(f"{fc2}.{kind}", None)
                plan.update({k: v for k, v in ((f"{fc1}.{kind}", b), (f"{fc2}.{kind}", a))
                             if v is not None})


def vision_weights(key: str, tensor: GGUFTensor,
                   dtype: mx.Dtype) -> tuple[dict[str, mx.array], Setting | None]:
    """The safetensors entries of one vision parameter, and (group_size, bits) if it stays
    quantized: block-format weights of the tower's linear layers are repacked exactly as in the
    text model (scales and biases in `dtype`); every other tensor keeps its stored float dtype
    (F16 stays float16, lossless) or, from a block format, is dequantized to float32."""
    module = key.removesuffix(".weight")
    if tensor.qtype not in FLOAT_FORMATS and module != key and module.endswith(_VISION_LINEAR):
        q = quantized(tensor)
        return {f"{module}.weight": mx.array(q.weight),
                f"{module}.scales": mx.array(q.scales).astype(dtype),
                f"{module}.biases": mx.array(q.biases).astype(dtype)}, (q.group_size, q.bits)
    values = to_float32(tensor)
    if key == _SOFT_EMB_NORM:
        values = values - 1  # llama.cpp stores Gemma's 1 + w; we compute x * (1 + w)
    if key == _PATCH_CONV:
        values = values.transpose(0, 2, 3, 1)  # torch's [out, in, kh, kw] -> MLX [out, kh, kw, in]
    stored = {Q.F16: mx.float16, Q.BF16: mx.bfloat16}.get(tensor.qtype, mx.float32)
    return {key: mx.array(values).astype(stored)}, None


def multimodal_config(text: dict[str, Any], vision: dict[str, Any], tokens_per_image: int,
                      tokens: list[str]) -> dict[str, Any]:
    """The HF Gemma 3 multimodal config (original style), as mlx-vlm and we read it."""
    def token_id(token: str, default: int) -> int:
        return tokens.index(token) if token in tokens else default

    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        # mlx-vlm reads the pooling from text_config's own mm_tokens_per_image (default 256)
        "text_config": {**{k: v for k, v in text.items() if k != "architectures"},
                        "mm_tokens_per_image": tokens_per_image},
        "vision_config": vision,
        "mm_tokens_per_image": tokens_per_image,
        # the 1B/270M vocabulary lacks <image_soft_token>: the model takes the id from here
        "image_token_index": token_id("<image_soft_token>", 262144),
        "boi_token_index": token_id("<start_of_image>", 255999),
        "eoi_token_index": token_id("<end_of_image>", 256000),
        **{k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype")},
    }


def write_preprocessor_config(vision: dict[str, Any], tokens_per_image: int,
                              out_dir: Path) -> None:
    """transformers' Gemma3ImageProcessor settings (what Google's repos ship), for mlx-vlm."""
    size = vision["image_size"]
    config = {"image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
              "do_resize": True, "size": {"height": size, "width": size}, "resample": 2,
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_convert_rgb": None,
              "do_pan_and_scan": None, "image_seq_length": tokens_per_image}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------------------------
# Tokenizer files

def _as_list(values: Any) -> list | None:
    return None if values is None else list(np.asarray(values).tolist())


def write_tokenizer(metadata: dict[str, Any], out_dir: Path) -> None:
    """tokenizer.json and its config, built from `tokenizer.ggml.*` as transformers does for
    `AutoTokenizer.from_pretrained(..., gguf_file=...)` (whose metadata reader needs torch)."""
    from transformers import GemmaTokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tokens = metadata["tokenizer.ggml.tokens"]
    spec = {"tokenizer_type": metadata.get("tokenizer.ggml.model", "llama"),
            "pre_tokenizer_type": metadata.get("tokenizer.ggml.pre"),
            "tokens": tokens,
            "scores": _as_list(metadata.get("tokenizer.ggml.scores")),
            "token_type": _as_list(metadata.get("tokenizer.ggml.token_type"))}
    backend, _ = convert_gguf_tokenizer("gemma3", spec)
    special = {name: tokens[metadata[f"tokenizer.ggml.{key}"]] for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
        if f"tokenizer.ggml.{key}" in metadata}
    flags = {"add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
             "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False))}
    tokenizer = GemmaTokenizer(tokenizer_object=backend, **special, **flags)
    template = metadata.get("tokenizer.chat_template")
    if template:  # a base model has none, and must not get one: "no template" means base model
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    # transformers 5 leaves the flags out; without them a reload that rebuilds the
    # post-processor would stop adding <bos>, which Gemma needs
    config_file = out_dir / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **flags}, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


# ---------------------------------------------------------------------------------------------
# Writing the folder

def write_weights(out_dir: Path, plan: dict[str, GGUFTensor], dtype: mx.Dtype,
                  progress: Callable | None = None) -> dict[str, Setting]:
    """model.safetensors (or 5 GB shards) and mlx-lm's index; returns the quantized modules.
    `progress`, a tqdm class, draws a bar over the GGUF bytes converted."""
    modules: dict[str, Setting] = {}
    bar = None
    if progress is not None:
        bar = progress(total=sum(t.raw.nbytes for t in plan.values()), unit="B",
                       unit_scale=True, desc="Importing")

    def entries() -> Iterator[dict[str, mx.array]]:
        for path, tensor in plan.items():
            vision = path.startswith((_VISION, _PROJECTOR))
            weights, setting = (vision_weights if vision else module_weights)(path, tensor, dtype)
            if setting is not None:
                modules[path.removesuffix(".weight")] = setting
            yield weights
            if bar is not None:
                bar.update(tensor.raw.nbytes)

    try:
        write_safetensors(out_dir, entries())
    finally:
        if bar is not None:
            bar.close()
    return modules


def import_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = DEFAULT_DTYPE,
                mmproj: str | Path | None = None, progress: Callable | None = None) -> Path:
    """Write a model folder for a Gemma 3 GGUF that `mlx_lm.load` (and gemma_mlx) can load:
    config.json (with mlx-lm's per-module "quantization"), model.safetensors (5 GB shards for
    big models) with its index, tokenizer.json, tokenizer_config.json, special_tokens_map.json
    and generation_config.json. config.json is written last: a folder without it is incomplete.

    With `mmproj`, llama.cpp's vision projector GGUF for this model, the folder holds the whole
    multimodal model in mlx-vlm's layout (and a preprocessor_config.json); its vision floats keep
    their stored dtype (see `vision_weights`). `progress` (a tqdm class) draws a bar.

    `dtype` is that of the scales, biases, norms and float matrices, and so the dtype mlx-lm
    computes in. Raises BadCheckpoint, before writing anything, for a truncated or corrupt file
    or one that is not a Gemma 3 text model (or, for `mmproj`, not its Gemma 3 projector).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    gguf = read_gguf(gguf_path)
    arch = _meta(gguf, "general.architecture")
    if arch != "gemma3":
        raise BadCheckpoint(f"{gguf.path}: architecture {arch!r} is not Gemma 3 (gemma3)")
    n_layers = _meta(gguf, "gemma3.block_count")
    plan = _module_plan(gguf, n_layers)
    vocab_size = plan["model.embed_tokens"].shape[0]
    config = text_config(gguf, vocab_size, "lm_head" not in plan, dtype)
    if mmproj is not None:
        projector = read_mmproj(mmproj)
        vision, tokens_per_image = vision_config(projector)
        vision_params = vision_plan(projector, vision, config["hidden_size"])
        config = multimodal_config(config, vision, tokens_per_image,
                                   gguf.metadata["tokenizer.ggml.tokens"])
        plan = {f"language_model.{p}": t for p, t in plan.items()} | vision_params

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    modules = write_weights(out, plan, DTYPES[dtype], progress)
    write_tokenizer(gguf.metadata, out)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "pad_token_id": config["pad_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if mmproj is not None:
        write_preprocessor_config(vision, tokens_per_image, out)
    if modules:
        config["quantization"] = _quantization(modules)
        if _on_q4_0_grid(plan):
            config["quantization"]["rule"] = RULE
        config["quantization_config"] = config["quantization"]  # mlx-community writes both
    (out / "config.json").write_text(json.dumps(config, indent=2))  # last: marks it complete
    return out
