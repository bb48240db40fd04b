"""Writing a model's weights as mlx-lm does: model.safetensors, or shards of at most 5 GB named
model-0000i-of-0000n.safetensors, and the index naming each weight's file.

The weights arrive as a stream of small dicts (a module's arrays at a time), so an import or a
conversion never holds more than one shard in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import mlx.core as mx

SHARD_BYTES = 5 << 30  # mlx-lm's shard size


def write_safetensors(out_dir: Path, entries: Iterable[dict[str, mx.array]]) -> None:
    """Write the weights and model.safetensors.index.json into `out_dir`, replacing the
    safetensors of an earlier write (a loader would read them too)."""
    for stale in out_dir.glob("model*.safetensors"):
        stale.unlink()
    written, weight_map, total = [], {}, 0
    for i, shard in enumerate(_shards(entries)):
        name = f".shard-{i}.safetensors"  # renamed once the shard count is known
        mx.save_safetensors(str(out_dir / name), shard, metadata={"format": "mlx"})
        written.append((name, sorted(shard)))
        total += sum(v.nbytes for v in shard.values())
    for i, (name, keys) in enumerate(written):
        final = ("model.safetensors" if len(written) == 1
                 else f"model-{i + 1:05d}-of-{len(written):05d}.safetensors")
        (out_dir / name).replace(out_dir / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def _shards(entries: Iterable[dict[str, mx.array]]) -> Iterator[dict[str, mx.array]]:
    """Group the weights into shards of at most SHARD_BYTES, in the order they come."""
    shard: dict[str, mx.array] = {}
    size = 0
    for entry in entries:
        nbytes = sum(v.nbytes for v in entry.values())
        if shard and size + nbytes > SHARD_BYTES:
            yield shard
            shard, size = {}, 0
        shard.update(entry)
        size += nbytes
    if shard:
        yield shard
