"""`convert`: write a model folder in the mlx-community layout (config.json with its
quantization, safetensors shards, tokenizer files) that mlx-lm / mlx-vlm and we can load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlx.utils import tree_flatten

from .errors import BadRequest
from .hub import check_mmproj, resolve
from .loading import STORED, checkpoint_key, load_net, quantize_spec, read_config
from .safetensors_out import write_safetensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "chat_template.json",
                   "chat_template.jinja", "generation_config.json", "preprocessor_config.json",
                   "processor_config.json")


def convert(source: str, out: str | Path, bits: int | None = None,
            group_size: int | None = None, dtype: str | None = None, quantize: bool = True,
            mmproj: str | None = None, qat: bool | None = None) -> Path:
    """`mmproj` (llama.cpp's vision projector file) goes with a .gguf source: the folder is
    then the whole vision model, in mlx-vlm's layout. `bits`, `group_size` and `qat` are as in
    `load`: `qat=True` quantizes with llama.cpp's Q4_0 rule (4 bits, groups of 32), and
    `qat=None` does for checkpoints marked as QAT for Q4_0, with a note on stderr. Unquantized
    tensors keep their stored dtype unless `dtype` is given."""
    out = Path(out)
    spec = quantize_spec(quantize, bits, group_size, qat)
    if out.exists() and any(out.iterdir()):
        raise BadRequest(f"{out} exists and is not empty: choose a new folder for --out")
    mmproj_path = check_mmproj(str(source), mmproj)
    if str(source).lower().endswith(".gguf") and Path(source).is_file():
        from .gguf import import_gguf  # GGUF blocks are imported as they are, losslessly

        if qat:
            check_gguf_q4_0(Path(source))
        return import_gguf(source, out, mmproj=mmproj_path, **({"dtype": dtype} if dtype else {}))
    src = resolve(source)
    net, quantization = load_net(src, spec, dtype or STORED, name=str(source))
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


def check_gguf_q4_0(path: Path) -> None:
    """--qat with a GGUF: its decoder's block-format matrices must be Q4_0 already (the import
    keeps blocks as they are; it cannot make another format the QAT grid)."""
    from .gguf import FLOAT_FORMATS, Q, read_gguf

    others = sorted({t.qtype.name for n, t in read_gguf(path).tensors.items()
                     if n.startswith("blk.") and t.qtype not in (*FLOAT_FORMATS, Q.Q4_0)})
    if others:
        raise BadRequest(f"{path} holds {', '.join(others)} blocks, not Q4_0, so --qat cannot "
                         "hold: convert Google's *-qat-q4_0-gguf file, or the unquantized "
                         "*-qat-q4_0-unquantized checkpoint")
