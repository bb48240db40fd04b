"""From a model folder to a ready model: config, weights (memory-mapped), quantization, tokenizer.

Reads the three safetensors layouts found in the wild — mlx-lm's text layout (`model.*`),
mlx-vlm's / Google's multimodal layout (`language_model.model.*`, `vision_tower.*`) and
transformers>=5 saves (`model.language_model.*`) — and maps them onto ours. A quantized checkpoint
is quantized exactly where its files have `scales`; an unquantized one is quantized on load
unless `quantize=False`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import qat
from .config import ModelConfig
from .distributed import JOIN_TIMEOUT_S, Sharding, start_group
from .errors import BadCheckpoint, BadRequest
from .model.gemma3 import Gemma3
from .model.vision import rename_vision_key, sanitize_vision_weights
from .models import locate, record_use

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


@dataclass(frozen=True)
class QuantizeSpec:
    """How to quantize an unquantized checkpoint on load (or in `convert`). None means the
    default: 4 bits in groups of 64 with MLX's min/max rule, or llama.cpp's Q4_0 rule (4 bits,
    groups of 32) for a checkpoint marked as QAT for Q4_0, with a note on stderr. `q4_0=True`
    asks for the Q4_0 rule whatever the checkpoint; False never uses it."""

    bits: int | None = None
    group_size: int | None = None
    q4_0: bool | None = False

    def validate(self) -> None:
        """The Q4_0 rule is 4 bits in groups of 32: anything else asked with it is an error."""
        if self.q4_0 and self.bits not in (None, qat.BITS):
            raise BadRequest(f"--qat / qat=True is llama.cpp's Q4_0 rule, 4 bits in groups of "
                             f"32: leave out --bits {self.bits} (bits={self.bits})")
        if self.q4_0 and self.group_size not in (None, qat.GROUP_SIZE):
            raise BadRequest(f"--qat / qat=True is llama.cpp's Q4_0 rule, 4 bits in groups of "
                             f"32: leave out --group-size {self.group_size} "
                             f"(group_size={self.group_size})")

    def resolved(self, marked_qat: bool = False) -> QuantizeSpec:
        """The settings to use on a checkpoint that is (or is not) marked as QAT for Q4_0."""
        q4_0 = self.q4_0 or (self.q4_0 is None and marked_qat and self.bits in (None, qat.BITS)
                             and self.group_size in (None, qat.GROUP_SIZE))
        if q4_0:
            return QuantizeSpec(qat.BITS, qat.GROUP_SIZE, True)
        return QuantizeSpec(self.bits or 4, self.group_size or 64, False)


def quantize_spec(quantize: bool, bits: int | None, group_size: int | None,
                  qat_rule: bool | None) -> QuantizeSpec | None:
    """`load`'s and `convert`'s quantization options as a spec, checked before any loading."""
    if not quantize:
        if qat_rule:
            raise BadRequest("--qat / qat=True quantizes with the Q4_0 rule: it cannot go with "
                             "--no-quantize (quantize=False)")
        return None
    spec = QuantizeSpec(bits, group_size, qat_rule)
    spec.validate()
    return spec


class Model:
    """A loaded Gemma 3: call it on token ids [B, L] for logits [B, L, vocab]."""

    def __init__(self, net: Gemma3, tokenizer: Any, path: Path, quantization: dict | None,
                 name: str | None = None, sharding: Sharding | None = None):
        self.name = name or path.name  # what the user called it: an alias, repo id or path
        self.net = net
        self.tokenizer = tokenizer
        self.config: ModelConfig = net.config
        self.path = path
        self.quantization = quantization
        self.sharding = sharding  # this rank's part, when spread over several (distributed.py)
        self.leader: Any = None  # rank 0's lockstep.Leader while the other ranks follow it

    def agree(self, token: mx.array) -> mx.array:
        """The sampled token every rank goes on with: this one on one machine, rank 0's
        across several (their random streams differ)."""
        return token if self.sharding is None else self.sharding.agree(token)

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
        if q and q.get("rule") == qat.RULE:
            quant += " Q4_0"
        return f"{self.name} ({quant})"

    @property
    def context_limit(self) -> int:
        return self.config.text.max_position_embeddings


KV_BITS = (4, 8)


def check_kv_bits(kv_bits: int | None) -> None:
    if kv_bits is not None and kv_bits not in KV_BITS:
        raise BadRequest(f"KV cache bits must be 4 or 8, or none for full precision "
                         f"(got {kv_bits})")


def load(name_or_path: str, quantize: bool = True, bits: int | None = None,
         group_size: int | None = None, dtype: str | None = None, progress: Any = None,
         mmproj: str | None = None, qat: bool | None = None, distributed: str | None = None,
         pipeline_split: Sequence[float] | None = None,
         join_timeout: float = JOIN_TIMEOUT_S, tokenizer: bool = True) -> Model:
    """Load a model by alias (270m, 1b, 4b, 12b, 27b, 1b-qat, ...), Hub repo id, folder, .gguf
    file or the name `gemma-mlx list` shows; `mmproj`, llama.cpp's vision projector file, adds
    the vision tower to a .gguf model.

    An unquantized checkpoint is quantized to `bits` (4) in groups of `group_size` (64) with
    MLX's rule, or, with `qat=True`, with llama.cpp's Q4_0 rule (4 bits, groups of 32), the grid
    Google's QAT checkpoints were trained for. `qat=None` picks the Q4_0 rule for checkpoints
    marked as QAT for Q4_0 (`*-qat-q4_0-unquantized`) and says so on stderr; `qat=False` never.
    With `qat=True` an already quantized model must be on the Q4_0 grid.

    `distributed` ("tensor" or "pipeline"), on every rank of an `mlx.launch`ed group, loads
    this rank's part of the model (distributed.py); `pipeline_split` gives each rank's share
    of the layers as ratios (even by default). Each rank reads only the weights it keeps.
    `join_timeout` bounds the wait for the other ranks to start; `tokenizer=False` skips the
    tokenizer (ranks that only follow rank 0 need none)."""
    spec = quantize_spec(quantize, bits, group_size, qat)
    if distributed is None and pipeline_split is not None:
        raise BadRequest("a pipeline split goes with --distributed pipeline")
    group = start_group(join_timeout) if distributed is not None else None
    path = locate(name_or_path, progress, mmproj)

    def shard(config: ModelConfig) -> Sharding | None:
        if group is None:
            return None
        return Sharding.plan(distributed, config, group, pipeline_split)

    net, quantization = load_net(path, spec, dtype, name=name_or_path, shard=shard)
    record_use(path)
    return Model(net, load_tokenizer(path) if tokenizer else None, path, quantization,
                 name_or_path, getattr(net, "sharding", None))


STORED = "stored"  # load_net's dtype for "as the files hold them" (convert's default)


def load_net(path: Path, quantize: QuantizeSpec | None = None, dtype: str | None = None,
             name: str | None = None,
             shard: Callable[[ModelConfig], Sharding | None] | None = None,
             ) -> tuple[Gemma3, dict | None]:
    """Build the network from a folder; returns it with its quantization settings. `dtype` is
    the floats' dtype: None for the compute dtype (`compute_dtype`), STORED to keep the files'.
    A model on the Q4_0 grid computes in float32 unless told otherwise, on a GPU too: its
    float16 scales do not fit bfloat16, and mixed dtypes would be promoted at every step.
    `name` is what the user called the model (a repo id marks a QAT checkpoint). `shard`
    gives this rank's part of the model (distributed.py): only its weights are read."""
    raw_config = read_config(path)
    config = ModelConfig.from_dict(raw_config)
    sharding = shard(config) if shard is not None else None
    if sharding is None:
        weights = sanitize(read_weights(path))
        net = Gemma3(config)
    else:
        weights = sanitize(read_weights(path, sharding.files(path, our_key)))
        weights = {k: v for k, v in weights.items() if sharding.wants(k)}
        net = sharding.build(config)
    quantization = raw_config.get("quantization") or raw_config.get("quantization_config")
    spec = None
    if any(k.endswith(".scales") for k in weights):
        quantization = _quantize_like_checkpoint(net, weights, quantization or {})
        on_grid = quantization.get("rule") == qat.RULE
    else:
        quantization = None
        if quantize is not None:
            spec = _resolve_spec(quantize, name, path, raw_config)
        on_grid = spec is not None and spec.q4_0
    dtype = dtype or compute_dtype() or ("float32" if on_grid else None)
    if dtype != STORED and dtype is not None:
        weights = _cast(weights, DTYPES[dtype], keep_scales=on_grid)
    try:
        net.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise BadCheckpoint(f"{path}: weights do not match a Gemma 3 of this config "
                            f"({str(e).splitlines()[0]})") from e
    weights.clear()  # the modules hold the arrays: quantizing frees each float layer in turn
    if quantization is not None and quantize is not None and quantize.q4_0 \
            and not qat.on_q4_0_grid(net):
        raise BadRequest(f"{name or path} is already quantized "
                         f"({quantization.get('bits')}-bit g{quantization.get('group_size')}), "
                         "not on the Q4_0 grid, so --qat / qat=True cannot hold: use a *-qat "
                         "alias (Google's Q4_0 GGUF) or the unquantized "
                         "google/gemma-3-*-it-qat-q4_0-unquantized checkpoint")
    if spec is not None:
        quantization = quantize_text_decoder(net, spec)
    if sharding is not None:
        sharding.place(net)
    mx.eval(net.parameters())
    return net, quantization


def _resolve_spec(quantize: QuantizeSpec, name: str | None, path: Path,
                  raw_config: dict[str, Any]) -> QuantizeSpec:
    """The settings for an unquantized checkpoint, and the note when QAT chose the Q4_0 rule."""
    spec = quantize.resolved(qat.is_q4_0_qat(name, path, raw_config))
    if spec.q4_0 and quantize.q4_0 is None:
        qat.note(f"{name or path.name} is a QAT checkpoint for Q4_0: quantizing it with "
                 "llama.cpp's Q4_0 rule (4 bits, groups of 32), the grid it was trained for; "
                 "--no-qat (qat=False) uses MLX's own rule")
    return spec


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


def read_weights(path: Path, files: list[Path] | None = None) -> dict[str, mx.array]:
    """All safetensors in the folder (or these `files` of it), loaded lazily: MLX maps them
    and reads on first use."""
    files = files if files is not None else sorted(path.glob("*.safetensors"))
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


def our_key(key: str) -> str | None:
    """A checkpoint's tensor name as `sanitize` names it (None for a tensor it drops)."""
    return _language_key(rename_vision_key(key))


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
    rule = {"rule": quantization["rule"]} if "rule" in quantization else {}
    return {"group_size": group_size, "bits": bits, **rule, **layers}


def _per_layer(per_layer: dict, path: str) -> dict | None:
    """A layer's own entry, under our name or the checkpoint's (text-only `model.*`)."""
    for name in (path, path.replace("language_model.model.", "model.", 1),
                 path.replace("language_model.", "", 1)):
        if name in per_layer:
            return per_layer[name]
    return None


def quantize_text_decoder(net: Gemma3, spec: QuantizeSpec) -> dict:
    """Quantize the decoder's linear layers and embedding; the vision tower stays as it is
    (it runs once per image and is sensitive to precision). With the Q4_0 rule, the linear
    layers only: the embedding (also the output head) stays as it is, as in Google's QAT GGUFs."""
    spec = spec.resolved()

    def predicate(path: str, module: nn.Module) -> bool:
        return (path.startswith("language_model.") and hasattr(module, "to_quantized")
                and module.weight.shape[-1] % spec.group_size == 0)

    if spec.q4_0:
        return qat.quantize_layers(net, predicate)
    nn.quantize(net, group_size=spec.group_size, bits=spec.bits, class_predicate=predicate)
    return {"group_size": spec.group_size, "bits": spec.bits}


def _cast(weights: dict[str, mx.array], dtype: mx.Dtype,
          keep_scales: bool = False) -> dict[str, mx.array]:
    """Cast floating tensors (not packed quantized weights) to `dtype`. `keep_scales` keeps the
    Q4_0 grid's scales and biases at float16 or wider: they are cast only to float32."""
    def cast(key: str, value: mx.array) -> mx.array:
        if not mx.issubdtype(value.dtype, mx.floating):
            return value
        if keep_scales and key.endswith((".scales", ".biases")) and dtype != mx.float32:
            return value
        return value.astype(dtype)

    return {k: cast(k, v) for k, v in weights.items()}


def folder_has_chat_template(path: Path) -> bool:
    """Whether the tokenizer in `path` carries a chat template, read from its files (without
    loading it): as transformers finds one."""
    if (path / "chat_template.jinja").exists() or (path / "chat_template.json").exists():
        return True
    config = path / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


TOKENIZERS_KEPT = 4  # tokenizers kept loaded in a process, the least recently used first out
_TOKENIZERS: OrderedDict[tuple, Any] = OrderedDict()
_TOKENIZERS_LOCK = threading.Lock()
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                    "chat_template.json")


def load_tokenizer(path: Path) -> Any:
    """mlx-lm's TokenizerWrapper (with its streaming detokenizer) over the HF tokenizer.

    Reading Gemma's 262k-token tokenizer takes about 6 s on a two-core x86 CPU (its 33 MB
    JSON is parsed several times), ten times the 270M's weights; so a process keeps the last
    few, by the contents of their files (hashing them takes ~50 ms): every Gemma 3 size has
    the same tokenizer, so a server loading a second model, or a model again, reads it once.
    They are shared: the wrapper hands every caller its own detokenizer."""
    from mlx_lm.tokenizer_utils import load as load_hf_tokenizer

    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
        raise BadCheckpoint(f"{path} has no tokenizer (tokenizer.json or tokenizer.model): "
                            "copy the tokenizer files from the original repo")
    key = tuple((name, _digest(f)) for name in _TOKENIZER_FILES if (f := path / name).exists())
    with _TOKENIZERS_LOCK:
        tokenizer = _TOKENIZERS.pop(key, None)
    if tokenizer is None:
        tokenizer = load_hf_tokenizer(path, eos_token_ids=[1, 106])
    with _TOKENIZERS_LOCK:
        _TOKENIZERS[key] = tokenizer
        while len(_TOKENIZERS) > TOKENIZERS_KEPT:
            _TOKENIZERS.popitem(last=False)
    return tokenizer


def _digest(file: Path) -> str:
    return hashlib.blake2b(file.read_bytes()).hexdigest()


def parameter_bytes(net: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(net.parameters()))
