"""`convert`: write a model folder in the mlx-community layout (config.json with its
quantization, safetensors shards, tokenizer files) that mlx-lm / mlx-vlm and we can load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlx.utils import tree_flatten

from .errors import BadRequest
from .hub import check_mmproj, resolve
from .loading import QuantizeSpec, checkpoint_key, load_net, read_config
from .safetensors_out import write_safetensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "chat_template.json",
                   "chat_template.jinja", "generation_config.json", "preprocessor_config.json",
                   "processor_config.json")


def convert(source: str, out: str | Path, bits: int = 4, group_size: int = 64,
            dtype: str | None = None, quantize: bool = True, mmproj: str | None = None) -> Path:
    """`mmproj` (llama.cpp's vision projector file) goes with a .gguf source: the folder is
    then the whole vision model, in mlx-vlm's layout."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BadRequest(f"{out} exists and is not empty: choose a new folder for --out")
    mmproj_path = check_mmproj(str(source), mmproj)
    if str(source).lower().endswith(".gguf") and Path(source).is_file():
        from .gguf import import_gguf  # GGUF blocks are imported as they are, losslessly

        return import_gguf(source, out, mmproj=mmproj_path, **({"dtype": dtype} if dtype else {}))
    src = resolve(source)
    spec = QuantizeSpec(bits, group_size) if quantize else None
    net, quantization = load_net(src, spec, dtype)
    config = read_config(src)
    config.pop("quantization_config", None)
    if quantization is not None:
        config["quantization"] = {checkpoint_key(k, net.config) if isinstance(v, dict) else k: v
                                  for k, v in quantization.items()}
        config["quantization_config"] = config["quantization"]  # mlx-community writes both
    weights = {checkpoint_key(k, net.config): v for k, v in tree_flatten(net.parameters())}
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, ({key: weights[key]} for key in sorted(weights)))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out
