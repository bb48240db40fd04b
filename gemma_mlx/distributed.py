"""Gemma 3 over several machines with `mx.distributed`: which part of the model each rank
holds, and how the ranks compute one forward pass together.

- **Tensor parallel**: every block's attention heads and MLP columns are split across the
  ranks with mlx.nn's sharded layers (q/k/v and gate/up all-to-sharded, o and down
  sharded-to-all, quantized ones included), so each block costs two `all_sum`s. Where there
  are more ranks than KV heads (the 270M and the 1B have one), each rank keeps a copy of the
  KV head its query heads read. Norms, the embedding (also the tied output head) and the
  vision tower (rank 0 only) are not split.
- **Pipeline parallel**: each rank runs a contiguous run of layers, evenly or in proportion
  to given ratios (the memory of each machine); hidden states go from rank to rank with
  `send`/`recv` (ring neighbours; NCCL has neither, so pipelines need the ring or JACCL),
  and the last rank's output reaches every rank, so all compute the same logits. A layer is
  sliding or global by its index in the whole model, never by its place on the rank: a split
  need not follow the sliding pattern.

Every rank reads only the tensors it keeps (`Sharding.wants`, `Sharding.files`): a pipeline
rank opens only the safetensors shards holding its layers (or the embedding and final norm,
which every rank keeps), and a tensor rank reads each block's full tensors one block at a
time, keeping its slices (`Sharding.place`). Files are memory-mapped: only the tensors a rank
keeps are read.

Every rank must run the same collective operations in the same order: call the model (or
generate) with the same inputs on every rank, and let `Sharding.agree` make the sampled
tokens rank 0's. `lockstep.py` lets rank 0 alone take requests (the CLI, a server).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig, TextConfig
from .errors import BadSplit, RankUnavailable
from .model.gemma3 import Gemma3
from .model.text import Block, TextDecoder
from .watchdog import Watchdog

MODES = ("tensor", "pipeline")
JOIN_TIMEOUT_S = 60.0  # how long a rank waits for the others to start

_group: Any = None  # the group of this process, started once


# ---- starting the group ---------------------------------------------------------------------

def start_group(timeout: float = JOIN_TIMEOUT_S) -> Any:
    """The group of every rank (`mx.distributed.init`), started once per process.

    MLX's start blocks, holding Python's lock, until every rank has connected: a rank that
    never comes would hang the others for ever. So a watchdog process (watchdog.py) ends this
    one with one clear line when the group has not formed within `timeout` seconds."""
    global _group
    if _group is not None:
        return _group
    watchdog = Watchdog.start(timeout)
    try:
        group = mx.distributed.init(strict=True)
        mx.eval(mx.distributed.all_sum(mx.array(1), group=group))  # everyone is there
    except RuntimeError as e:
        raise RankUnavailable(
            f"no distributed backend started ({e}): launch every rank with mlx.launch, e.g. "
            "mlx.launch --hostfile HOSTS.json -- python -m gemma_mlx --distributed tensor "
            "...") from e
    finally:
        watchdog.joined()
    _group = group
    return group


# ---- the plan: what this rank holds ---------------------------------------------------------

@dataclass(frozen=True)
class RankOf:
    """Rank `rank` of a group of `size`, without processes: to plan what a rank would hold
    (memory tables, tests)."""

    index: int
    count: int

    def rank(self) -> int:
        return self.index

    def size(self) -> int:
        return self.count


@dataclass
class Sharding:
    """This rank's part of the model: `mode` "tensor" or "pipeline", the group, and for a
    pipeline the global indices of the layers it runs."""

    mode: str
    group: Any
    layers: range | None = None
    last: mx.array | None = field(default=None, repr=False)  # the last agreed token: `settle`

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    @classmethod
    def plan(cls, mode: str, config: ModelConfig, group: Any,
             ratios: Sequence[float] | None = None) -> Sharding:
        """Check that the model splits `mode`-wise over the group (a BadSplit that names the
        fix otherwise) and return this rank's part."""
        if mode not in MODES:
            raise BadSplit(f"--distributed takes tensor or pipeline (got {mode!r})")
        if ratios is not None and mode != "pipeline":
            raise BadSplit("a pipeline split goes with --distributed pipeline only")
        if mode == "tensor":
            check_tensor_split(config.text, group.size())
            return cls(mode, group)
        split = split_layers(config.text.num_hidden_layers, group.size(), ratios)
        return cls(mode, group, split[group.rank()])

    # ---- reading only what this rank keeps ----

    def wants(self, key: str) -> bool:
        """Whether this rank keeps the tensor named `key` (our names, loading.sanitize's):
        the vision tower and projector live on rank 0; a pipeline rank keeps its layers."""
        if key.startswith(("vision_tower.", "multi_modal_projector.")):
            return self.rank == 0
        layer = _layer_of(key)
        return layer is None or self.layers is None or layer in self.layers

    def files(self, path: Path, rename: Any) -> list[Path] | None:
        """The safetensors files this rank opens (None: all of them). A sharded checkpoint's
        index says which file holds each tensor; `rename` maps its names onto ours."""
        index = path / "model.safetensors.index.json"
        if self.layers is None or not index.exists():
            return None
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names = {file for key, file in weight_map.items()
                 if (ours := rename(key)) is not None and self.wants(ours)}
        return sorted(path / name for name in names)

    # ---- building and placing ----

    def build(self, config: ModelConfig) -> Gemma3:
        """The network this rank runs, with only the modules it keeps (their weights unread)."""
        return DistributedGemma3(config, self)

    def place(self, net: Gemma3) -> None:
        """Split the blocks (tensor) and read the weights, a block at a time, so that a
        rank's peak memory is its share plus about a block, not the whole model."""
        decoder = net.decoder
        for i, block in enumerate(decoder.layers):
            if block is None:
                continue
            if self.mode == "tensor":
                shard_block(block, decoder.cfg, self.group, i)
            mx.eval(block.parameters())

    def agree(self, token: mx.array) -> mx.array:
        """Rank 0's sampled token, on every rank: ranks sample from the same logits, but their
        random streams differ, and a rank that continued with another token would compute
        another sequence."""
        self.last = broadcast(token, self.group)
        return self.last

    def settle(self) -> None:
        """Wait for the last step this rank queued (its agreed token). When a rank dies, MLX
        fails the collectives in flight, but one queued after them, even one that depends on
        them, then waits for ever: a rank settles before it starts a collective of its own
        (lockstep.py), so that the failure raises here instead."""
        if self.last is not None:
            mx.eval(self.last)

    def broadcast(self, x: mx.array) -> mx.array:
        """Rank 0's `x` on every rank, once the steps queued before have run (`settle`)."""
        self.settle()
        return broadcast(x, self.group)


def _layer_of(key: str) -> int | None:
    prefix = "language_model.model.layers."
    if not key.startswith(prefix):
        return None
    return int(key[len(prefix):].split(".", 1)[0])


def broadcast(x: mx.array, group: Any) -> mx.array:
    """Rank 0's `x` on every rank (lazy; every rank calls it with an array of x's shape and
    dtype). A sum with zeros: the ring backend has no broadcast, and adding zeros is exact.
    The zeros still depend on the rank's own `x`, so that evaluating the result runs what
    computes x (a forward pass and its collectives) on every rank alike: without it, a rank
    would skip them and leave the others waiting in theirs."""
    if group.size() == 1:
        return x
    mine = x if group.rank() == 0 else mx.depends(mx.zeros_like(x), x)
    return mx.distributed.all_sum(mine, group=group)


# ---- tensor parallel ------------------------------------------------------------------------

def check_tensor_split(cfg: TextConfig, size: int) -> None:
    """Heads, KV heads and MLP columns must split evenly over `size` ranks."""
    heads, kv, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    if heads % size:
        raise BadSplit(f"tensor parallel splits the {heads} attention heads across the ranks, "
                       f"and {size} ranks do not divide {heads}: run on "
                       f"{_divisors(heads)} ranks, or use --distributed pipeline")
    if (kv % size if size <= kv else size % kv):
        raise BadSplit(f"tensor parallel needs the {kv} KV heads to split evenly or to repeat "
                       f"evenly over {size} ranks: run on {_divisors(heads)} ranks, or use "
                       "--distributed pipeline")
    if hidden % size:
        raise BadSplit(f"tensor parallel splits the {hidden} MLP columns, and {size} ranks do "
                       "not divide them: use --distributed pipeline")


def _divisors(n: int) -> str:
    return " or ".join(str(d) for d in range(2, n + 1) if n % d == 0)


def shard_block(block: Block, cfg: TextConfig, group: Any, index: int = 0) -> None:
    """Split one block over the group in place: q/k/v and gate/up all-to-sharded (each rank
    computes its heads and columns), o and down sharded-to-all (an all_sum each). Where ranks
    outnumber KV heads, the KV heads are repeated first, so rank r keeps head r * kv // size,
    the one its query heads read."""
    from mlx.nn.layers.distributed import shard_linear

    size = group.size()
    attn, mlp = block.self_attn, block.mlp
    _check_groups(attn.o_proj, cfg.num_attention_heads * cfg.head_dim, size, index, "o_proj")
    _check_groups(mlp.down_proj, cfg.intermediate_size, size, index, "down_proj")
    repeat = max(1, size // attn.n_kv_heads)
    for name in ("k_proj", "v_proj"):
        if repeat > 1:
            _repeat_heads(getattr(attn, name), repeat, cfg.head_dim)
    for owner, name, kind in ((attn, "q_proj", "all-to-sharded"),
                              (attn, "k_proj", "all-to-sharded"),
                              (attn, "v_proj", "all-to-sharded"),
                              (attn, "o_proj", "sharded-to-all"),
                              (mlp, "gate_proj", "all-to-sharded"),
                              (mlp, "up_proj", "all-to-sharded"),
                              (mlp, "down_proj", "sharded-to-all")):
        setattr(owner, name, shard_linear(getattr(owner, name), kind, group=group))
    attn.n_heads //= size
    attn.n_kv_heads = attn.n_kv_heads * repeat // size


def _check_groups(layer: nn.Module, inputs: int, size: int, index: int, name: str) -> None:
    """A quantized sharded-to-all layer splits its inputs at whole quantization groups."""
    group_size = getattr(layer, "group_size", None)
    if group_size is not None and (inputs // size) % group_size:
        raise BadSplit(f"layer {index}'s {name} is quantized in groups of {group_size}, and "
                       f"its {inputs} inputs do not split into whole groups over {size} "
                       "ranks: use fewer ranks, or --distributed pipeline")


def _repeat_heads(layer: nn.Module, repeat: int, head_dim: int) -> None:
    """Repeat each KV head's output rows `repeat` times (weights, scales and biases alike)."""
    for name in ("weight", "scales", "biases", "bias"):
        if name in layer:
            a = layer[name]
            heads = a.shape[0] // head_dim
            a = mx.repeat(a.reshape(heads, head_dim, -1), repeat, axis=0)
            layer[name] = a.reshape(heads * repeat * head_dim, *layer[name].shape[1:])


# ---- pipeline parallel ----------------------------------------------------------------------

def split_layers(n_layers: int, size: int, ratios: Sequence[float] | None = None) -> list[range]:
    """Contiguous runs of layers, rank 0 first: even, or in proportion to `ratios` (say, each
    machine's free memory), each rank at least one layer."""
    if size > n_layers:
        raise BadSplit(f"a pipeline gives each rank at least one layer, and the model has "
                       f"{n_layers}: run on {n_layers} ranks or fewer")
    ratios = list(ratios) if ratios is not None else [1.0] * size
    if len(ratios) != size or any(not math.isfinite(r) or r <= 0 for r in ratios):
        raise BadSplit(f"the pipeline split needs one positive ratio per rank ({size}), got "
                       f"{','.join(f'{r:g}' for r in ratios)}")
    exact = [n_layers * r / sum(ratios) for r in ratios]
    counts = [max(1, math.floor(x)) for x in exact]
    while sum(counts) < n_layers:  # largest remainders first
        i = max(range(size), key=lambda j: exact[j] - counts[j])
        counts[i] += 1
    while sum(counts) > n_layers:
        i = max((j for j in range(size) if counts[j] > 1), key=lambda j: counts[j] - exact[j])
        counts[i] -= 1
    starts = [sum(counts[:r]) for r in range(size)]
    return [range(s, s + c) for s, c in zip(starts, counts, strict=True)]


class LayerElsewhere:
    """The KV cache of a layer another rank runs: no keys or values here, only how many tokens
    the layer has seen, so that offsets, trims and masks read the same on every rank."""

    keys = values = None

    def __init__(self, window: int | None, kv_bits: int | None = None):
        self.offset = 0
        self.max_size = window  # a sliding layer's window, as its RotatingKVCache has
        self.bits = kv_bits  # how its owner stores a global layer (lockstep tells followers)

    @property
    def state(self) -> list:
        return []

    def is_trimmable(self) -> bool:
        return self.max_size is None or self.offset < self.max_size

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n


class PipelineDecoder(TextDecoder):
    """The decoder of one pipeline rank: its layers (the others are None), the embedding and
    final norm. A forward pass receives the hidden states from the rank before, runs this
    rank's layers with each layer's own mask and cache by its global index, sends them on,
    and returns the last rank's result, normed, on every rank."""

    def __init__(self, cfg: TextConfig, layers: range, group: Any):
        super().__init__(cfg)
        self.layers = [b if i in layers else None for i, b in enumerate(self.layers)]
        self.group = group
        self._handoff: mx.array | None = None  # the last forward pass's gathered output

    def __call__(self, h: mx.array, cache: list | None = None,
                 masks: tuple[Any, Any] | None = None, eval_layers: bool = False) -> mx.array:
        rank, size = self.group.rank(), self.group.size()
        cache = cache or [None] * len(self.layers)
        global_mask, sliding_mask = masks if masks is not None else self.causal_masks(h, cache)
        if self._handoff is not None:
            # A receive depends on nothing here, so within one evaluation MLX may run it
            # before the previous pass's gather, and the ranks (whose graphs differ) would
            # wait on each other: queue the previous pass first (a no-op once it has run).
            mx.async_eval(self._handoff)
        if rank > 0:
            h = mx.distributed.recv_like(h, rank - 1, group=self.group)
        queued = None
        for i, layer in enumerate(self.layers):
            if layer is None:
                continue
            h = layer(h, sliding_mask if self.cfg.is_sliding(i) else global_mask, cache[i])
            if eval_layers:  # as TextDecoder does: block by block, one queued ahead
                mx.async_eval(h)
                if queued is not None:
                    mx.eval(queued)
                queued = h
        if rank < size - 1:
            h = mx.distributed.send(h, rank + 1, group=self.group)
        h = mx.distributed.all_gather(h, group=self.group)[-h.shape[0]:]  # the last rank's
        self._account(cache, h)
        self._handoff = h
        return self.norm(h)

    def _account(self, cache: list, h: mx.array) -> None:
        """Count the tokens for the layers run elsewhere, and make this rank's last cache
        depend on the hand-off: prefill evaluates only the caches between chunks, and the
        sends and the gather must run then on every rank."""
        last = None
        for i, c in enumerate(cache):
            if isinstance(c, LayerElsewhere):
                c.offset += h.shape[1]
            elif c is not None and self.layers[i] is not None:
                last = c
        if last is None or last.keys is None:
            return
        if isinstance(last.keys, tuple):  # a quantized cache: (packed, scales, biases)
            last.keys = tuple(mx.depends(list(last.keys), [h]))
        else:
            last.keys = mx.depends(last.keys, h)

    def causal_masks(self, h: mx.array, cache: list) -> tuple[Any, Any]:
        """Masks from this rank's own caches: the first global and the first sliding layer it
        runs (None for a kind it has none of)."""
        own = [i for i, layer in enumerate(self.layers) if layer is not None]
        return super().causal_masks(h, cache, own)

    def make_cache(self, kv_bits: int | None = None) -> list:
        """A cache per layer of the whole model, as on one machine: mlx-lm's for this rank's
        layers, stand-ins (`LayerElsewhere`) for the others."""
        caches = super().make_cache(kv_bits)
        return [c if layer is not None else
                LayerElsewhere(self.cfg.sliding_window if self.cfg.is_sliding(i) else None,
                               None if self.cfg.is_sliding(i) else kv_bits)
                for i, (c, layer) in enumerate(zip(caches, self.layers, strict=True))]


# ---- the whole model ------------------------------------------------------------------------

class DistributedGemma3(Gemma3):
    """Gemma 3 on one rank: a pipeline rank's decoder holds its layers only, and the vision
    tower and projector live on rank 0, which shares the soft tokens of every image."""

    def __init__(self, config: ModelConfig, sharding: Sharding):
        super().__init__(config)
        self.sharding = sharding
        self.share_images = True  # False while rank 0 leads (lockstep: features travel along)
        if sharding.layers is not None:
            self.language_model.model = PipelineDecoder(config.text, sharding.layers,
                                                        sharding.group)
        if sharding.rank != 0 and config.has_vision:
            self.pop("vision_tower")
            self.pop("multi_modal_projector")

    def encode_images(self, pixel_values: mx.array) -> mx.array:
        """Rank 0 runs the vision tower; every rank returns its soft tokens (every rank calls
        this with pixels of the same shape)."""
        rank = self.sharding.rank
        if not self.share_images:
            return super().encode_images(pixel_values)
        shape = (pixel_values.shape[0], self.config.mm_tokens_per_image,
                 self.config.text.hidden_size)
        dtype = self.decoder.norm.weight.dtype
        features = (super().encode_images(pixel_values).astype(dtype) if rank == 0
                    else mx.zeros(shape, dtype))
        features = broadcast(features, self.sharding.group)
        mx.eval(features)  # now: left lazy, a pipeline rank could order it after a receive
        return features
