"""Single-token decode as one compiled MLX graph over mlx-lm's caches (`CompiledDecode`).

The text decoder (model/text.py) is the reference: this step computes the same thing for one
token at a time, with fixed shapes so `mx.compile` can trace it once, and fused projections.
tests/test_decode.py holds it to the op-by-op model's logits. The dependency runs one way:
this module reads the decoder's modules; the decoder knows nothing of its compiled step (the
engine asks `compiled_decode(decoder, cache)` for it).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import quantized_scaled_dot_product_attention
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from ..config import TextConfig
from .text import RMSNorm, TextDecoder

DECODE_CAPACITY_STEP = 512  # compiled decode grows a global layer's cache by this many slots


def compiled_decode(decoder: TextDecoder, cache: list) -> CompiledDecode | None:
    """The compiled single-token step of `decoder` for these caches, laid out for it, or None
    where it does not apply (caches of other kinds, batches, an empty cache): then decode the
    ordinary way, through the decoder."""
    if not CompiledDecode.supports(decoder.cfg, cache):
        return None
    fast = decode_program(decoder)
    fast.prepare(cache)
    return fast


def decode_program(decoder: TextDecoder, dense: bool = False) -> CompiledDecode:
    """The decoder's CompiledDecode, made on first use and again after its weights were
    replaced. Making it fuses the q/k/v and gate/up weights in place (see there). It is kept
    in the decoder's instance dict (a plain attribute, not a parameter), so it lives and dies
    with the decoder; text.py never reads it. `dense`: the same step over the quantized
    weights dequantized to the compute dtype (`CompiledDecode.densified`)."""
    fast = decoder.__dict__.get(_PROGRAM)
    if fast is None or not fast.current():
        fast = CompiledDecode(decoder)
        decoder.__dict__[_PROGRAM] = fast
        decoder.__dict__.pop(_DENSE_PROGRAM, None)
    if not dense:
        return fast
    if _DENSE_PROGRAM not in decoder.__dict__:
        decoder.__dict__[_DENSE_PROGRAM] = fast.densified()
    return decoder.__dict__[_DENSE_PROGRAM]


def release_program(decoder: TextDecoder) -> None:
    """Drop the decoder's compiled program (made again on next use). A thread that traced one
    releases it before it ends: MLX aborts the process at exit over a compiled function that
    outlives the thread that traced it."""
    decoder.__dict__.pop(_PROGRAM, None)
    decoder.__dict__.pop(_DENSE_PROGRAM, None)


_PROGRAM = "_compiled_decode"  # decode_program's slot in a decoder's instance dict
_DENSE_PROGRAM = "_compiled_decode_dense"


class CompiledDecode:
    """Single-token decode as one compiled MLX graph (the gpt-fast approach) over mlx-lm's own
    cache objects, so prefill, trimming and reuse between chat turns work as before.

    Compiling pays only with fixed shapes. Each global layer's KVCache is given a capacity (a
    multiple of DECODE_CAPACITY_STEP) and written with `slice_update` at an array offset; each
    sliding layer's RotatingKVCache is kept as a ring of exactly `window` slots, position p at
    slot p % window (a layout mlx-lm's rotating cache reads as its own); a QuantizedKVCache
    (`--kv-bits`) likewise, its packed values, scales and biases written at the offset and
    read through quantized matmuls. Attention runs over
    the whole buffer with a mask of the slots written so far, RoPE takes the offset as an
    array, and the offset stays on the device, so one trace serves every step until a global
    cache grows. The step takes the token, the offset and the cache buffers and returns the
    logits, the next offset and the new buffers, which replace the old ones in the caches
    before anything is evaluated, so MLX writes them in place rather than copying them.

    Fewer, larger kernels: each block's q/k/v projections become one matrix, and gate/up
    another (their rows concatenated: the same values and quantization groups), and the
    modules' own weights become row slices of those matrices, which share their memory, so
    prefill and the parameter tree are as before at no extra memory. The norms' (1 + w)
    scales are computed once here instead of on every step."""

    def __init__(self, decoder: TextDecoder):
        self.decoder = decoder
        self.cfg = decoder.cfg
        self.qkv = [_fuse_rows([b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj])
                    for b in decoder.layers]
        self.gate_up = [_fuse_rows([b.mlp.gate_proj, b.mlp.up_proj]) for b in decoder.layers]
        mx.eval([[m.parameters() for m, _ in g] for g in self.qkv + self.gate_up])
        self._weights = _leaf_ids(decoder)  # after fusing: the slices are the weights now
        eps = self.cfg.rms_norm_eps
        self.eps = eps

        def scale(norm: RMSNorm) -> mx.array:
            return 1.0 + norm.weight

        self.scales = [
            [scale(n) for n in (b.input_layernorm, b.self_attn.q_norm, b.self_attn.k_norm,
                                b.post_attention_layernorm, b.pre_feedforward_layernorm,
                                b.post_feedforward_layernorm)]
            for b in decoder.layers]
        self.final_scale = scale(decoder.norm)
        self.o_proj = [b.self_attn.o_proj for b in decoder.layers]
        self.down_proj = [b.mlp.down_proj for b in decoder.layers]
        self.head = decoder.logits
        mx.eval(self.scales, self.final_scale)
        self._fn = mx.compile(self._step)
        self._offset: mx.array | None = None
        self._offset_value = -1
        self._start = mx.zeros((1,), mx.int32)  # the single stream starts at slot 0
        self._quantized: list[tuple[int, int] | None] = []  # per layer: (group, bits) or None

    @staticmethod
    def supports(cfg: TextConfig, cache: list) -> bool:
        if not cache or len(cache) != cfg.num_hidden_layers or cache[0].offset == 0:
            return False
        for i, c in enumerate(cache):
            if cfg.is_sliding(i):
                ok = (type(c) is RotatingKVCache and c.keep == 0
                      and c.max_size == cfg.sliding_window)
            else:
                ok = type(c) in (KVCache, QuantizedKVCache)
            if not ok or c.keys is None or _kv_arrays(c)[0].shape[0] != 1 \
                    or c.offset != cache[0].offset:
                return False
        return True

    def current(self) -> bool:
        """False once the decoder's weights were replaced (the trace holds the old ones)."""
        return _leaf_ids(self.decoder) == self._weights

    # ---- the caches in the compiled layout ------------------------------------------------

    def prepare(self, cache: list) -> None:
        for i, c in enumerate(cache):
            if self.cfg.is_sliding(i):
                _to_ring(c)
            else:
                _reserve(c, c.offset + 1)

    def step(self, token: mx.array, cache: list) -> mx.array:
        """Feed one token (shape [1]) at the caches' offset; return the logits [vocab]. The
        one-row case of `step_rows`: the row starts at slot 0 of a timeline at its offset."""
        offset = cache[0].offset
        for i, c in enumerate(cache):
            if not self.cfg.is_sliding(i) and offset + 1 > _kv_arrays(c)[0].shape[2]:
                _reserve(c, offset + 1)  # a new shape: the step is traced again, rarely
        if self._offset is None or self._offset_value != offset:
            self._offset = mx.array(offset, dtype=mx.int32)
        # Read when tracing; a quantized cache's buffers have other shapes, so another trace.
        self._quantized = [(c.group_size, c.bits) if isinstance(c, QuantizedKVCache) else None
                           for c in cache]
        buffers = [a for c in cache for a in _kv_arrays(c)]
        self._offset, logits, *new = self._fn(token, self._offset, self._start, *buffers)
        logits = logits[0]
        del buffers  # the caches' references go next: the old buffers become donatable
        self._offset_value = offset + 1
        start = 0
        for c in cache:
            n = len(_kv_arrays(c))
            _set_kv_arrays(c, new[start:start + n])
            start += n
            c.offset += 1
            if isinstance(c, RotatingKVCache):
                c._idx = c.offset % c.max_size if c.offset >= c.max_size else c.offset
        return logits

    def step_rows(self, tokens: mx.array, now: mx.array, starts: mx.array,
                  buffers: list[mx.array]) -> tuple[mx.array, list[mx.array], mx.array]:
        """One token for each of B rows (continuous batching) on a shared timeline: every row
        writes at slot `now` of the global layers and `now % window` of the rings (one
        in-place write for all rows), and row b, whose first token went to slot starts[b], is
        at position now - starts[b]. `tokens` [B]; buffers laid out as the caches' but B rows
        deep ([B, kv heads, slots, head dim] per array); `now` and `starts` int32 arrays,
        kept on the device by the caller. Returns the logits [B, vocab], the new buffers, which
        replace the old ones before anything is evaluated, and now + 1 (on the device). Every
        row is computed: a free row (start = now) is ignored by its caller."""
        next_now, logits, *new = self._fn(tokens, now, starts, *buffers)
        return logits, new, next_now

    def set_quantized(self, quantized: list[tuple[int, int] | None]) -> None:
        """Per layer (group, bits) of a quantized cache, or None: read when tracing."""
        self._quantized = quantized

    # ---- the traced function ----------------------------------------------------------------

    def _step(self, tokens: mx.array, now: mx.array, starts: mx.array,
              *buffers: mx.array) -> tuple:
        """B rows on one timeline: writes at slot `now` (in place), positions now - starts."""
        d, eps, head_dim = self.decoder, self.eps, self.cfg.head_dim
        B = tokens.shape[0]
        # The rows as one sequence [1, B, hidden]: a matmul over them is then one B-row product
        # (M = B), which MLX's CUDA backend runs as one pass over the weights, not B products
        # of one row each (M = 1, batch B). Attention alone needs them apart.
        h = d.embed(tokens.reshape(1, B))
        positions = now - starts  # [B]
        masks: dict[tuple[int, bool], mx.array] = {}
        out: list[mx.array] = []
        for i, layer in enumerate(d.layers):
            quantized = self._quantized[i]
            n = 6 if quantized else 2  # keys and values, or their (packed, scales, biases)
            parts, buffers = buffers[:n], buffers[n:]
            size = parts[0].shape[2]
            sliding = self.cfg.is_sliding(i)
            if (size, sliding) not in masks:
                masks[size, sliding] = _row_mask(now, starts, size, sliding)
            mask = masks[size, sliding]
            slot = (now % size if sliding else now).reshape(1)
            s_in, s_q, s_k, s_attn, s_pre, s_post = self.scales[i]
            attn = layer.self_attn
            q, k, v = self._project(i, mx.fast.rms_norm(h, s_in, eps))
            # One position: [1, B, heads * head_dim] is already [B, heads, 1, head_dim].
            q = q.reshape(B, attn.n_heads, 1, head_dim)
            k = k.reshape(B, attn.n_kv_heads, 1, head_dim)
            v = v.reshape(B, attn.n_kv_heads, 1, head_dim)
            q = attn.rope(mx.fast.rms_norm(q, s_q, eps), offset=positions)
            k = attn.rope(mx.fast.rms_norm(k, s_k, eps), offset=positions)
            if quantized is None:
                keys, values = (mx.slice_update(buffer, x.astype(buffer.dtype), slot, axes=(2,))
                                for buffer, x in zip(parts, (k, v), strict=True))
                o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=attn.scale,
                                                         mask=mask)
                out += [keys, values]
            else:
                group, bits = quantized
                new = [mx.slice_update(buffer, x, slot, axes=(2,)) for buffer, x in zip(
                    parts, (*mx.quantize(k.astype(parts[1].dtype), group, bits),
                            *mx.quantize(v.astype(parts[4].dtype), group, bits)), strict=True)]
                o = quantized_scaled_dot_product_attention(
                    q, new[:3], new[3:], scale=attn.scale, mask=mask, group_size=group,
                    bits=bits)
                out += new
            h = h + mx.fast.rms_norm(self.o_proj[i](o.reshape(1, B, -1)), s_attn, eps)
            x = mx.fast.rms_norm(h, s_pre, eps)
            h = h + mx.fast.rms_norm(self._mlp(i, x), s_post, eps)
        logits = self.head(mx.fast.rms_norm(h, self.final_scale, eps))
        return (now + 1, logits[0], *out)

    def _project(self, i: int, x: mx.array) -> list[mx.array]:
        """q, k and v of one block."""
        return _apply_fused(self.qkv[i], x)

    def _mlp(self, i: int, x: mx.array) -> mx.array:
        gate, up = _apply_fused(self.gate_up[i], x)
        return self.down_proj[i](nn.gelu_approx(gate) * up)

    def densified(self) -> CompiledDecode:
        """This step over dense copies of the quantized weights, in the compute dtype: more
        memory (a 4B: about 8 GB beside its 2.5), for a step whose cost grows less with the
        rows. Measured on an H100 through MLX's CUDA backend (benchmarks/batch_levers.py), a
        step of 8 or 16 rows took 15.4 / 19.4 ms over 4-bit weights and 11.8 / 14.8 dense,
        so batches of several rows run faster dense there; one row runs the quantized step."""
        import copy

        dense = copy.copy(self)
        dense.qkv = [[(_dense(m), rows) for m, rows in group] for group in self.qkv]
        dense.gate_up = [[(_dense(m), rows) for m, rows in group] for group in self.gate_up]
        dense.o_proj = [_dense(m) for m in self.o_proj]
        dense.down_proj = [_dense(m) for m in self.down_proj]
        embed = self.decoder.embed_tokens
        if isinstance(embed, nn.QuantizedEmbedding):
            table = _dequantized(embed)
            dense.head = lambda h: h @ table.T
        mx.eval([[m.parameters() for m, _ in g] for g in dense.qkv + dense.gate_up],
                [m.parameters() for m in dense.o_proj + dense.down_proj])
        dense._fn = mx.compile(dense._step)
        return dense


def _row_mask(now: mx.array, starts: mx.array, size: int, sliding: bool) -> mx.array:
    """[B, 1, 1, size]: the slots each row may attend to, this step's included. Global
    layers: slots starts[b]..now. A ring of `size` slots holds timeline step
    now - ((now - s) mod size) in slot s: the last `size` steps (the window); row b sees those
    from its start on."""
    slots = mx.arange(size)[None]
    if sliding:
        written = now - ((now - slots) % size)
        allowed = written >= starts[:, None]
    else:
        allowed = (slots >= starts[:, None]) & (slots <= now)
    return allowed.reshape(starts.shape[0], 1, 1, size)


def _dequantized(m: nn.Module) -> mx.array:
    return mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=m.group_size,
                         bits=m.bits, mode=m.mode).astype(m.scales.dtype)


def _dense(m: nn.Module) -> nn.Module:
    """A quantized linear layer as a plain one (others as they are)."""
    if not isinstance(m, nn.QuantizedLinear):
        return m
    weight = _dequantized(m)
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in m)
    dense.weight = weight
    if "bias" in m:
        dense.bias = m.bias
    return dense


def _apply_fused(groups: list[tuple[nn.Module, list[int]]], x: mx.array) -> list[mx.array]:
    outs = []
    for module, rows in groups:
        y = module(x)
        start = 0
        for n in rows:
            outs.append(y[..., start:start + n] if len(rows) > 1 else y)
            start += n
    return outs


def _fuse_rows(layers: list[nn.Module]) -> list[tuple[nn.Module, list[int]]]:
    """The layers as groups [(layer, [output rows of each original])]: neighbours of the same
    kind and quantization (and no bias) become one layer whose output rows are theirs in
    order, and their own arrays become row slices of it (views: no copy stays behind).
    Mixed-precision checkpoints (e.g. 8-bit v_proj beside 5-bit q/k) fuse what matches."""

    def kind(m: nn.Module) -> tuple:
        return (type(m), getattr(m, "group_size", None), getattr(m, "bits", None),
                getattr(m, "mode", None), "bias" in m, "biases" in m)

    def fusable(m: nn.Module) -> bool:
        return type(m) in FUSABLE and "bias" not in m

    runs: list[list[nn.Module]] = []
    for m in layers:
        if runs and fusable(m) and fusable(runs[-1][0]) and kind(runs[-1][0]) == kind(m):
            runs[-1].append(m)
        else:
            runs.append([m])
    return [_fuse_run(run) for run in runs]


# Layers whose forward pass is one matmul of the rows they hold: a tensor-parallel rank's
# all-to-sharded layers too (distributed.py), which hold its rows and talk to no other rank.
FUSABLE = (nn.Linear, nn.QuantizedLinear, nn.AllToShardedLinear, nn.QuantizedAllToShardedLinear)


def _fuse_run(run: list[nn.Module]) -> tuple[nn.Module, list[int]]:
    first = run[0]
    rows = [m.weight.shape[0] for m in run]
    if len(run) == 1:
        return first, rows
    if isinstance(first, (nn.QuantizedLinear, nn.QuantizedAllToShardedLinear)):
        names = ["weight", "scales"] + (["biases"] if "biases" in first else [])
        in_dims = first.weight.shape[1] * 32 // first.bits
        fused = nn.QuantizedLinear(in_dims, sum(rows), bias=False, group_size=first.group_size,
                                   bits=first.bits, mode=first.mode)
        if "biases" not in first:
            fused.pop("biases", None)
    else:
        names = ["weight"]
        fused = nn.Linear(first.weight.shape[1], sum(rows), bias=False)
    for name in names:
        fused[name] = mx.concatenate([m[name] for m in run])
    mx.eval(fused.parameters())
    start = 0
    for m, n in zip(run, rows, strict=True):
        for name in names:
            m[name] = fused[name][start:start + n]
        start += n
        mx.eval(m.parameters())
    return fused, rows


def _leaf_ids(module: nn.Module) -> list[int]:
    return [id(v) for _, v in tree_flatten(module.parameters())]


def _kv_arrays(c: Any) -> list[mx.array]:
    """A cache's buffers, flat: keys then values, each one array or, in a quantized cache,
    three (packed values, scales, biases)."""
    if isinstance(c, QuantizedKVCache):
        return [*c.keys, *c.values]
    return [c.keys, c.values]


def _set_kv_arrays(c: Any, arrays: list[mx.array]) -> None:
    half = len(arrays) // 2
    if isinstance(c, QuantizedKVCache):
        c.keys, c.values = tuple(arrays[:half]), tuple(arrays[half:])
    else:
        c.keys, c.values = arrays


def _reserve(c: KVCache | QuantizedKVCache, needed: int) -> None:
    """Grow a global layer's buffers to hold `needed` tokens, in whole DECODE_CAPACITY_STEPs."""
    arrays = _kv_arrays(c)
    if needed <= arrays[0].shape[2]:
        return
    size = -(-needed // DECODE_CAPACITY_STEP) * DECODE_CAPACITY_STEP
    _set_kv_arrays(c, [mx.concatenate(
        [a[..., :c.offset, :], mx.zeros((*a.shape[:2], size - c.offset, a.shape[3]), a.dtype)],
        axis=2) for a in arrays])


def _to_ring(c: RotatingKVCache) -> None:
    """Lay a RotatingKVCache out as a ring of exactly max_size slots with position p at slot
    p % max_size, and `_idx` where mlx-lm's own in-place writes would put the next token."""
    W = c.max_size
    if c.keys.shape[2] == W and c._idx % W == c.offset % W:
        return  # already so: the next write goes to slot offset % W
    n = min(c.offset, W)
    keys, values = (_temporal_order(c, a)[..., -n:, :] for a in (c.keys, c.values))
    if c.offset < W:
        pad = W - n
        keys = mx.concatenate([keys, mx.zeros((*keys.shape[:2], pad, keys.shape[3]),
                                              keys.dtype)], axis=2)
        values = mx.concatenate([values, mx.zeros((*values.shape[:2], pad, values.shape[3]),
                                                  values.dtype)], axis=2)
    else:
        keys = mx.roll(keys, c.offset % W, axis=2)
        values = mx.roll(values, c.offset % W, axis=2)
    c.keys, c.values = keys, values
    c._idx = c.offset % W if c.offset >= W else c.offset


def _temporal_order(c: RotatingKVCache, v: mx.array) -> mx.array:
    """The cached tokens oldest first, as mlx-lm's RotatingKVCache orders them (keep == 0)."""
    if c._idx == v.shape[2]:
        return v
    if c._idx < c.offset:
        return mx.concatenate([v[..., c._idx:, :], v[..., :c._idx, :]], axis=2)
    return v[..., :c._idx, :]
