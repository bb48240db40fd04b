"""From a model folder to a ready model: config, weights (memory-mapped), quantization, tokenizer.

Reads the three safetensors layouts found in the wild — mlx-lm's text layout (`model.*`),
mlx-vlm's / Google's multimodal layout (`language_model.model.*`, `vision_tower.*`) and
transformers>=5 saves (`model.language_model.*`) — and maps them onto ours. A quantized checkpoint
is quantized exactly where its files have `scales`; an unquantized one is quantized on load
unless `quantize=False`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig
from .errors import BadCheckpoint, BadRequest
from .model.gemma3 import Gemma3
from .model.vision import sanitize_vision_weights
from .models import locate, record_use

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


@dataclass
class QuantizeSpec:
    """How to quantize an unquantized checkpoint on load (or in `convert`)."""

    bits: int = 4
    group_size: int = 64


class Model:
    """A loaded Gemma 3: call it on token ids [B, L] for logits [B, L, vocab]."""

    def __init__(self, net: Gemma3, tokenizer: Any, path: Path, quantization: dict | None,
                 name: str | None = None):
        self.name = name or path.name  # what the user called it: an alias, repo id or path
        self.net = net
        self.tokenizer = tokenizer
        self.config: ModelConfig = net.config
        self.path = path
        self.quantization = quantization

    def __call__(self, ids: mx.array, cache: list | None = None,
                 pixel_values: mx.array | None = None) -> mx.array:
        return self.net(ids, cache=cache, pixel_values=pixel_values)

    def make_cache(self, kv_bits: int | None = None) -> list:
        """A fresh KV cache; `kv_bits` 4 or 8 quantizes the global layers' keys and values."""
        check_kv_bits(kv_bits)
        return self.net.make_cache(kv_bits)

    @property
    def has_chat_template(self) -> bool:
        """Instruction-tuned checkpoints ship a chat template; base models do not."""
        return getattr(self.tokenizer, "chat_template", None) is not None

    @property
    def description(self) -> str:
        """e.g. 'gemma-3-4b-it-qat-4bit (4-bit g64)'."""
        q = self.quantization
        quant = f"{q['bits']}-bit g{q['group_size']}" if q else self.config.text.dtype
        return f"{self.name} ({quant})"

    @property
    def context_limit(self) -> int:
        return self.config.text.max_position_embeddings


KV_BITS = (4, 8)


def check_kv_bits(kv_bits: int | None) -> None:
    if kv_bits is not None and kv_bits not in KV_BITS:
        raise BadRequest(f"KV cache bits must be 4 or 8, or none for full precision "
                         f"(got {kv_bits})")


def load(name_or_path: str, quantize: bool = True, bits: int = 4, group_size: int = 64,
         dtype: str | None = None, progress: Any = None, mmproj: str | None = None) -> Model:
    """Load a model by alias (270m, 1b, 4b, 12b, 27b), Hub repo id, folder, .gguf file or the
    name `gemma-mlx list` shows; `mmproj`, llama.cpp's vision projector file, adds the vision
    tower to a .gguf model."""
    path = locate(name_or_path, progress, mmproj)
    spec = QuantizeSpec(bits, group_size) if quantize else None
    net, quantization = load_net(path, spec, dtype)
    record_use(path)
    return Model(net, load_tokenizer(path), path, quantization, name_or_path)


def load_net(path: Path, quantize: QuantizeSpec | None = None,
             dtype: str | None = None) -> tuple[Gemma3, dict | None]:
    """Build the network from a folder; returns it with its quantization settings."""
    raw_config = read_config(path)
    config = ModelConfig.from_dict(raw_config)
    weights = sanitize(read_weights(path))
    net = Gemma3(config)
    quantization = raw_config.get("quantization") or raw_config.get("quantization_config")
    if any(k.endswith(".scales") for k in weights):
        quantization = _quantize_like_checkpoint(net, weights, quantization or {})
    else:
        quantization = None
    dtype = dtype or compute_dtype()
    if dtype is not None:
        weights = _cast(weights, DTYPES[dtype])
    try:
        net.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise BadCheckpoint(f"{path}: weights do not match a Gemma 3 of this config "
                            f"({str(e).splitlines()[0]})") from e
    if quantization is None and quantize is not None:
        quantization = quantize_text_decoder(net, quantize)
    mx.eval(net.parameters())
    return net, quantization


def compute_dtype() -> str | None:
    """float32 on MLX's CPU backend, which has no fast half-precision kernels (bf16 runs about
    7x slower there); the checkpoint's own dtype on a GPU."""
    return "float32" if mx.default_device() == mx.cpu else None


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not path.is_dir():
        raise BadCheckpoint(f"{path} is not a folder: point the model at a Gemma 3 folder "
                            "(config.json + *.safetensors) or a .gguf file")
    if not config_file.exists():
        raise BadCheckpoint(f"{path} has no config.json: point the model at a Gemma 3 folder "
                            "(config.json + *.safetensors) or a .gguf file")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadCheckpoint(f"{config_file} is not valid JSON ({e}): re-download the model") from e
    model_type = config.get("model_type")
    if model_type not in ("gemma3", "gemma3_text"):
        raise BadCheckpoint(f"{path} holds a '{model_type}' model, not Gemma 3 "
                            "(model_type gemma3 or gemma3_text)")
    return config


def read_weights(path: Path) -> dict[str, mx.array]:
    """All safetensors in the folder, loaded lazily: MLX maps them and reads on first use."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BadCheckpoint(f"{path} has no *.safetensors weights: re-download the model or "
                            "convert it with `python -m gemma_mlx convert`")
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError, OSError) as e:
            raise BadCheckpoint(f"{f} is corrupt or truncated ({str(e).splitlines()[0]}): "
                                "delete it and download or convert the model again") from e
    return weights


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map every known checkpoint layout onto ours (`language_model.model.*`, ...)."""
    out = {}
    for key, value in sanitize_vision_weights(weights).items():
        key = _language_key(key)
        if key is not None:
            out[key] = value
    return out


def _language_key(key: str) -> str | None:
    if key.startswith(("lm_head.", "language_model.lm_head.")):
        return None  # the head is tied to the embedding
    if key.startswith(("vision_tower.", "multi_modal_projector.", "language_model.model.")):
        return key
    for prefix in ("model.language_model.", "model."):
        if key.startswith(prefix):
            return "language_model.model." + key[len(prefix):]
    return key


def checkpoint_key(key: str, config: ModelConfig) -> str:
    """Our key as the mlx-community layout writes it: mlx-lm's for text-only models."""
    if not config.has_vision and key.startswith("language_model.model."):
        return "model." + key[len("language_model.model."):]
    return key


def _quantize_like_checkpoint(net: Gemma3, weights: dict, quantization: dict) -> dict:
    """Quantize exactly the layers whose files have `scales`, with their own bits and groups."""
    from mlx_lm.utils import infer_quant_config

    per_layer = {k: v for k, v in quantization.items() if isinstance(v, dict)}
    layers = {}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        params = _per_layer(per_layer, path) or infer_quant_config(path, module, weights)
        layers[path] = params
        return params

    group_size = quantization.get("group_size", 64)
    bits = quantization.get("bits", 4)
    nn.quantize(net, group_size=group_size, bits=bits, class_predicate=predicate)
    return {"group_size": group_size, "bits": bits, **layers}


def _per_layer(per_layer: dict, path: str) -> dict | None:
    """A layer's own entry, under our name or the checkpoint's (text-only `model.*`)."""
    for name in (path, path.replace("language_model.model.", "model.", 1),
                 path.replace("language_model.", "", 1)):
        if name in per_layer:
            return per_layer[name]
    return None


def quantize_text_decoder(net: Gemma3, spec: QuantizeSpec) -> dict:
    """Quantize the decoder's linear layers and embedding; the vision tower stays as it is
    (it runs once per image and is sensitive to precision)."""

    def predicate(path: str, module: nn.Module) -> bool:
        return (path.startswith("language_model.") and hasattr(module, "to_quantized")
                and module.weight.shape[-1] % spec.group_size == 0)

    nn.quantize(net, group_size=spec.group_size, bits=spec.bits, class_predicate=predicate)
    return {"group_size": spec.group_size, "bits": spec.bits}


def _cast(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Cast floating tensors (not packed quantized weights) to `dtype`."""
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()}


def load_tokenizer(path: Path) -> Any:
    """mlx-lm's TokenizerWrapper (with its streaming detokenizer) over the HF tokenizer."""
    from mlx_lm.tokenizer_utils import load as load_hf_tokenizer

    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
        raise BadCheckpoint(f"{path} has no tokenizer (tokenizer.json or tokenizer.model): "
                            "copy the tokenizer files from the original repo")
    return load_hf_tokenizer(path, eos_token_ids=[1, 106])


def parameter_bytes(net: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(net.parameters()))
