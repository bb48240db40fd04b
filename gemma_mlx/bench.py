"""`python -m gemma_mlx bench`: prefill and decode speed, time to first token and peak memory.

Each figure is the median over `--repeats` runs. With `--compare mlx-lm`, mlx-lm's own Gemma 3
(`mlx_lm.models.gemma3_text`, driven by `mlx_lm.generate.generate_step`) runs on the very same
weight arrays in the same process, interleaved with ours run by run (ours, peer, peer, ours, ...),
so background load hits both alike. `--random 1b|4b|...` builds a real-shape model with random
4-bit weights (group 64) and no tokenizer, so the benchmark needs no download.

`--image`: each prompt holds one image: <bos>, <start_of_image>, its 256 soft tokens,
<end_of_image>, then random text ids up to the prompt length. The image is random pixel values
(uniform in [-1, 1], seeded) at the config's size, [1, 3, 896, 896]: no decoding or resizing is
timed, but encoding them through the vision tower and projector is, inside the time to first
token. A random 4b/12b/27b then gets a random SigLIP So400m tower (unquantized, in the compute
dtype, as in mlx-community's checkpoints); `--random tiny` a tiny one (56px, 4 soft tokens).

`--compare mlx-vlm` (a dev dependency): mlx-vlm's own Gemma 3 (`mlx_vlm.models.gemma3`, or
`gemma3_text` for 1b/270m) on the same weight arrays, tower included, driven by
`mlx_vlm.generate.generate_step` with input ids, pixel values and mask as its `stream_generate`
passes them; with or without `--image`.

`--kv-bits 8|4` and `--max-context N` bound our KV cache as the CLI options of the same names
do (a quantized cache for the global layers; only the newest N tokens of a longer prompt, after
<bos>, as a conversation drops its oldest turns). Without `--compare`, the peer is then our own
engine with the whole full-precision cache ("gemma-mlx full KV"), so the ratios say what the
bound saves, e.g. `--random 4b --prompt-tokens 32768,131072 --kv-bits 8`.

`--json-schema FILE`: constrained decoding. The peer is then our own engine with that JSON
schema as a constraint (peer "json schema"), on the same prompts, interleaved with plain decoding;
each reply the grammar completes starts it again, so every generated token pays its mask. Each
prompt length gets `constraint`: `decode_ratio` (decode tok/s constrained / plain, medians;
the cost is 1 - it), `paired_ratio` (the median of each repeat's ratio, the two runs side by
side: steadier on a shared machine), `mask_ms` (host milliseconds per token computing masks,
overlapped with the device's step) and `replies` (grammar-complete replies, over the
repeats). A random model borrows the 270M's tokenizer (a real vocabulary: 270m and larger).

`--draft-model NAME`: speculative decoding. The peer is then our own engine drafting with
that model (`--num-draft-tokens` at a time, default 3), on the same prompts and caches as the
plain run it is interleaved with; the report adds each prompt length's acceptance rate and the
decode speed-up over plain decoding. With `--random`, NAME is a shape too (random weights:
expect next to no drafts accepted, which measures the mechanism's cost); the model's own name
or shape drafts with the model itself (every greedy draft accepted: the ceiling). With
`--model`, any model the other commands take (a real draft: real acceptance).

Both sides are timed the same way, from outside their token generators: the time to first
token runs from the call until the first token id is on the host (prefill plus one sampled
token); prefill tok/s is prompt tokens over that time; decode tok/s is the tokens after the
first over the time after the first. Greedy sampling. Peak memory is MLX's peak allocation
during the run (weights included), after `mx.reset_peak_memory()`.

JSON output (`--json`), one object:

    model            what was measured, e.g. "random 4b (4-bit g64)" ("random 4b with vision
                     tower (4-bit g64)" with --image or --compare mlx-vlm, whose Gemma 3
                     always has one) or the model's description
    device           MLX's default device, e.g. "Device(gpu, 0)"
    dtype            compute dtype of the unquantized tensors ("float32" on CPU, else "bfloat16")
    mlx, mlx_lm      library versions
    mlx_vlm          mlx-vlm's version with --compare mlx-vlm, else null
    image            whether each prompt holds one image (--image); its tokens count in
                     prompt_tokens and its encoding in ttft_s
    gen_tokens       tokens generated per run
    compiled         whether our decode steps ran compiled (false with --no-compile)
    repeats          runs per implementation and prompt length (figures are medians)
    kv_bits          our KV cache bits (--kv-bits), or null for full precision
    max_context      our context bound (--max-context), or null
    peer             the implementation compared against ("mlx-lm", "mlx-vlm", with a bound
                     and no --compare "gemma-mlx full KV", with --draft-model "speculative",
                     with --json-schema "json schema"), or null
    json_schema      with --json-schema: the schema file; else null
    draft            with --draft-model: {model (its description), num_draft_tokens}; else null
    results          one entry per prompt length:
      prompt_tokens  prompt length
      ours, peer     figures (peer is null without --compare):
        prefill_tps        prompt tokens per second (prompt tokens / ttft_s; with
                           --max-context, the tokens kept)
        decode_tps         generated tokens after the first per second after the first
        ttft_s             seconds from the call to the first generated token
        peak_memory_bytes  MLX's peak memory during the run
        kv_cache_bytes     the KV cache's buffers at the end of the run (0 where the
                           implementation does not expose its cache: mlx-vlm)
        generated_tokens   tokens generated (gen_tokens)
        runs               each repeat's {ttft_s, prefill_tps, decode_tps, peak_memory_bytes,
                           kv_cache_bytes}
      ratio          ours / peer for prefill_tps, decode_tps, ttft_s, peak_memory_bytes and
                     kv_cache_bytes (above 1 is better for the speeds, below 1 for time and
                     memory); or null
      constraint     with --json-schema (else null): decode_ratio, paired_ratio, mask_ms,
                     replies
      speculative    with --draft-model (else null), over the repeats of this prompt length:
        acceptance_rate   accepted_tokens / drafted_tokens
        drafted_tokens    tokens the draft model proposed
        accepted_tokens   of those, the tokens the model accepted
        speedup           decode_tps speculative (peer) / plain (ours); above 1 is faster
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .chat import MIN_CONTEXT
from .config import ModelConfig
from .constrain import Constraint, Grammar, json_schema
from .engine import SamplingSettings, Stats, generate_tokens
from .errors import BadImage, BadRequest
from .loading import Model, QuantizeSpec, compute_dtype, quantize_text_decoder
from .model.decode import decode_program
from .model.gemma3 import Gemma3
from .speculative import (
    DEFAULT_NUM_DRAFT_TOKENS,
    Draft,
    check_draft,
    check_num_draft_tokens,
    load_draft,
)

# hidden, MLP, layers, heads, kv heads, head_dim, q scale, window, vocab, context, RoPE factor
# (REFERENCE.md). "tiny" is for tests: seconds on any machine.
SHAPES: dict[str, tuple] = {
    "tiny": (64, 128, 4, 4, 2, 32, 32, 16, 1024, 4096, 8.0),
    # tiny with Gemma's vocabulary: a short step beside the host's per-token work over 262k
    # tokens (a grammar's mask), as on a fast GPU; `bench --json-schema` takes it
    "tiny-vocab": (64, 128, 4, 4, 2, 32, 32, 16, 262144, 4096, 8.0),
    "270m": (640, 2048, 18, 4, 1, 256, 256, 512, 262144, 32768, 1.0),
    "1b": (1152, 6912, 26, 4, 1, 256, 256, 512, 262144, 32768, 1.0),
    "4b": (2560, 10240, 34, 8, 4, 256, 256, 1024, 262208, 131072, 8.0),
    "12b": (3840, 15360, 48, 16, 8, 256, 256, 1024, 262208, 131072, 8.0),
    "27b": (5376, 21504, 62, 32, 16, 128, 168, 1024, 262208, 131072, 8.0),
}
# SigLIP towers: hidden, MLP, layers, heads, image size, patch, soft tokens per image
# (REFERENCE.md: So400m/14 at 896px on 4B/12B/27B). 1B and 270M are text only. The tiny one
# has its own image token ids inside the tiny vocabulary (boi, eoi, image), below the ids the
# random text prompts use.
SO400M = (1152, 4304, 27, 16, 896, 14, 256)
VISION_SHAPES: dict[str, tuple] = {"tiny": (32, 64, 2, 4, 56, 14, 4), "4b": SO400M,
                                   "12b": SO400M, "27b": SO400M}
TINY_IMAGE_IDS = {"boi_token_index": 997, "eoi_token_index": 998, "image_token_index": 999}
PEERS = ("mlx-lm", "mlx-vlm")
FULL_CACHE = "gemma-mlx full KV"  # the peer of --kv-bits / --max-context without --compare
FIGURES = ("ttft_s", "prefill_tps", "decode_tps", "peak_memory_bytes", "kv_cache_bytes")


def shape_config(shape: str, dtype: str = "bfloat16", vision: bool = False) -> ModelConfig:
    """The config of a Gemma 3 size (the original config style, sliding pattern 6; 2 for
    `tiny`, so its 4 layers hold both kinds): text only, or with `vision` its SigLIP tower."""
    (hidden, mlp, layers, heads, kv_heads, head_dim, q_scale, window, vocab, context,
     factor) = SHAPES[shape]
    raw = dict(model_type="gemma3_text", hidden_size=hidden, intermediate_size=mlp,
               num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, head_dim=head_dim, query_pre_attn_scalar=q_scale,
               sliding_window=window, vocab_size=vocab, max_position_embeddings=context,
               sliding_window_pattern=2 if shape.startswith("tiny") else 6, torch_dtype=dtype,
               rope_scaling={"rope_type": "linear", "factor": factor} if factor != 1 else None)
    if not vision:
        return ModelConfig.from_dict(raw)
    hidden, mlp, layers, heads, image, patch, tokens = VISION_SHAPES[shape]
    tower = dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                 num_attention_heads=heads, image_size=image, patch_size=patch)
    ids = TINY_IMAGE_IDS if shape == "tiny" else {}
    return ModelConfig.from_dict({"model_type": "gemma3", "text_config": raw, "torch_dtype": dtype,
                                  "vision_config": tower, "mm_tokens_per_image": tokens, **ids})


# ---- the two implementations on one set of weights -----------------------------------------

def random_model(shape: str, bits: int = 4, group_size: int = 64,
                 dtype: str | None = None, vision: bool = False) -> Model:
    """A real-shape Gemma 3 with random quantized weights, built without ever materializing
    float decoder weights (a 4B in float32 would be 16 GB). With `vision` (4b, 12b, 27b, tiny)
    it has a random SigLIP tower and projector too, in float as in mlx-community's checkpoints
    (the compute dtype: float32 on CPU, bfloat16 on GPU)."""
    if vision and shape not in VISION_SHAPES:
        raise BadImage(f"random {shape} takes text only: use 4b, 12b or 27b for images")
    dtype = dtype or compute_dtype() or "bfloat16"
    config = shape_config(shape, vision=vision)
    net = Gemma3(config)
    quantization = quantize_text_decoder(net, QuantizeSpec(bits, group_size))
    float_dtype = getattr(mx, dtype)
    weights = {}
    for name, value in tree_flatten(net.parameters()):
        if not name.startswith("language_model."):  # the vision tower and projector
            weights[name] = random_vision_weight(name, value.shape, float_dtype)
        elif name.endswith(".weight") and value.dtype == mx.uint32:  # packed 4-bit
            weights[name] = mx.random.randint(-(2**31), 2**31 - 1, value.shape,
                                              dtype=mx.int32).view(mx.uint32)
        elif name.endswith(".scales"):
            # scale * (q - 8) with q uniform in 0..15 has variance 21.25 scale^2: keep each
            # layer's output at unit variance per input, so random activations stay finite.
            fan_in = value.shape[-1] * group_size
            base = (21.25 * fan_in) ** -0.5
            weights[name] = (base * mx.random.uniform(0.5, 1.5, value.shape)).astype(float_dtype)
        elif name.endswith(".biases"):
            continue  # set from the scales below
        else:  # the norms: (1 + w) scaling around the identity
            weights[name] = (0.05 * mx.random.normal(value.shape)).astype(float_dtype)
    for name in list(weights):
        if name.endswith(".scales"):
            weights[name[: -len("scales")] + "biases"] = -(2 ** (bits - 1)) * weights[name]
    net.load_weights(list(weights.items()), strict=True)
    mx.eval(net.parameters())
    name = f"random {shape}" + (" with vision tower" if vision else "")
    return Model(net, None, Path(f"random-{shape}"), quantization, name=name)


def random_vision_weight(name: str, shape: tuple, dtype: mx.Dtype) -> mx.array:
    """Keeps activations at unit scale through the tower: conv and linear weights
    N(0, 1/fan_in), zero biases, LayerNorm scales around 1, the projector's RMSNorm (1 + w)
    around the identity."""
    if name.endswith(".bias"):
        return mx.zeros(shape, dtype=dtype)
    if "layer_norm" in name or "layernorm" in name:
        return (1 + 0.05 * mx.random.normal(shape)).astype(dtype)
    if name.endswith("mm_soft_emb_norm.weight"):
        return 0.05 * mx.random.normal(shape, dtype=dtype)
    if name.endswith("position_embedding.weight"):
        return mx.random.normal(shape, dtype=dtype)
    # [out, in] linears, [out, kh, kw, in] patch conv, [in, out] projection matrix
    fan_in = shape[0] if name.endswith("mm_input_projection_weight") else math.prod(shape[1:])
    return mx.random.normal(shape, dtype=dtype, scale=fan_in**-0.5)


def mlx_lm_peer(model: Model) -> nn.Module:
    """mlx-lm's Gemma 3 text model holding the same weight arrays as ours (no copy): our
    keys are mlx-lm's with a `language_model.` prefix; quantized exactly where ours is."""
    from mlx_lm.models import gemma3_text

    ref = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(model.config.text.to_hf()))
    ref.sanitize({})  # the head is tied to the embedding
    ours = model.net.language_model
    return share_weights(ref, ours, dict(tree_flatten(ours.parameters())))


def share_weights(ref: nn.Module, ours: nn.Module, weights: dict[str, mx.array],
                  aliases: dict[str, str] | None = None) -> nn.Module:
    """Quantize the peer `ref` exactly where `ours` is quantized (a peer module named in
    `aliases` follows ours of that name), then load our arrays into it: no copy."""
    aliases = aliases or {}
    quantized = {path: module for path, module in ours.named_modules() if hasattr(module, "bits")}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        mine = quantized.get(aliases.get(path, path))
        if mine is None:
            return False
        return {"group_size": mine.group_size, "bits": mine.bits, "mode": mine.mode}

    nn.quantize(ref, class_predicate=predicate)
    ref.load_weights(list(weights.items()), strict=True)
    return ref


def mlx_vlm_version() -> str:
    """mlx-vlm is a dev dependency: imported only for `--compare mlx-vlm`."""
    try:
        import mlx_vlm
    except ImportError as e:
        raise BadRequest("--compare mlx-vlm needs mlx-vlm, a dev dependency: install the dev "
                         "extra (pip install -e '.[dev]')") from e
    return mlx_vlm.__version__


def mlx_vlm_peer(model: Model) -> nn.Module:
    """mlx-vlm's Gemma 3 (`mlx_vlm.models.gemma3`, or `gemma3_text` for a text-only model)
    holding the same weight arrays as ours (no copy), configured as mlx-vlm's loader configures
    it from our config.json. Our keys are mlx-vlm's; its output head, tied to the embedding,
    gets the embedding's arrays; quantized exactly where ours is.

    Known differences (mlx-vlm 0.7.10), none of which changes the work done: its SigLIP
    post-LayerNorm has eps 1e-5 (config: 1e-6); it scales the soft tokens by
    sqrt(text hidden) / sqrt(2048), its default top-level hidden_size, where the reference
    does not scale them; and its prefill is causal over the image tokens (ours, as the
    reference, lets one image's tokens see each other both ways)."""
    mlx_vlm_version()
    from mlx_vlm.models import gemma3, gemma3_text
    from mlx_vlm.utils import update_module_configs

    raw = model.config.to_hf()
    if model.config.has_vision:
        # mlx-vlm reads mm_tokens_per_image from text_config (default 256, the real value).
        raw["text_config"]["mm_tokens_per_image"] = model.config.mm_tokens_per_image
        config = gemma3.ModelConfig.from_dict(raw)
        ref = gemma3.Model(update_module_configs(config, gemma3, raw, ["text", "vision"]))
    else:
        ref = gemma3_text.Model(gemma3_text.ModelConfig.from_dict(raw))
    weights = dict(tree_flatten(model.net.parameters()))
    embed, head = "language_model.model.embed_tokens", "language_model.lm_head"
    weights.update({head + k[len(embed):]: v for k, v in weights.items() if k.startswith(embed)})
    return share_weights(ref, model.net, weights, aliases={head: embed})


@dataclass
class Run:
    ttft_s: float
    prefill_tps: float
    decode_tps: float
    peak_memory_bytes: int
    kv_cache_bytes: int = 0  # the KV cache's buffers after the run (0: not known)


class Implementation:
    name = "?"
    cache: list | None = None  # the last run's KV cache, where the implementation exposes it

    def tokens(self, prompt: list[int], max_tokens: int, pixel_values: mx.array | None = None):
        """Greedy token ids; `pixel_values` [1, 3, H, W] fill the prompt's image tokens."""
        raise NotImplementedError

    def fit(self, prompt: list[int], max_tokens: int) -> list[int]:
        """The prompt as this implementation takes it (all of it, unless bounded)."""
        return prompt

    def run(self, prompt: list[int], max_tokens: int,
            pixel_values: mx.array | None = None) -> Run:
        """One timed generation (greedy), timed identically for every implementation: with an
        image, its encoding (tower and projector) is inside the time to first token."""
        prompt = self.fit(prompt, max_tokens)
        mx.clear_cache()
        mx.reset_peak_memory()
        n = 0
        start = time.perf_counter()
        first = last = start
        for _ in self.tokens(prompt, max_tokens, pixel_values):
            last = time.perf_counter()
            if n == 0:
                first = last
            n += 1
            if n == max_tokens:
                break
        ttft = first - start
        decode = (n - 1) / (last - first) if n > 1 and last > first else 0.0
        kv_bytes = sum(c.nbytes for c in self.cache) if self.cache else 0
        self.cache = None
        return Run(ttft, len(prompt) / ttft, decode, mx.get_peak_memory(), kv_bytes)


class Ours(Implementation):
    """Our engine; with `kv_bits` its cache is quantized, and with `max_context` it keeps
    only the newest tokens of a longer prompt (after <bos>), as a conversation drops its
    oldest turns, so the cache never holds more than `max_context` tokens."""

    def __init__(self, model: Model, compiled: bool = True, kv_bits: int | None = None,
                 max_context: int | None = None, name: str = "gemma-mlx"):
        self.model = model
        self.compiled = compiled
        self.kv_bits = kv_bits
        self.max_context = max_context
        self.name = name

    def fit(self, prompt: list[int], max_tokens: int) -> list[int]:
        if self.max_context and len(prompt) + max_tokens > self.max_context:
            return prompt[:1] + prompt[len(prompt) + max_tokens + 1 - self.max_context:]
        return prompt

    def tokens(self, prompt: list[int], max_tokens: int, pixel_values: mx.array | None = None):
        features = None
        if pixel_values is not None:  # as Chat does: encode the image, then prefill
            features = self.model.net.encode_images(pixel_values)
            mx.eval(features)
        settings = SamplingSettings(temp=0.0, max_tokens=max_tokens)
        self.cache = self.model.make_cache(self.kv_bits)
        return generate_tokens(self.model, prompt, self.cache, settings, Stats(),
                               image_features=features, compiled=self.compiled)


class Speculative(Ours):
    """Our engine drafting with a draft model; keeps each run's Stats (acceptance figures)."""

    def __init__(self, model: Model, draft: Model, num_draft_tokens: int, compiled: bool = True,
                 kv_bits: int | None = None, max_context: int | None = None):
        super().__init__(model, compiled, kv_bits, max_context, name="speculative")
        self.draft = draft
        self.num_draft_tokens = num_draft_tokens
        self.stats: list[Stats] = []  # every run's, warm-up first

    def tokens(self, prompt: list[int], max_tokens: int, pixel_values: mx.array | None = None):
        features = None
        if pixel_values is not None:
            features = self.model.net.encode_images(pixel_values)
            mx.eval(features)
        settings = SamplingSettings(temp=0.0, max_tokens=max_tokens)
        self.cache = self.model.make_cache(self.kv_bits)
        self.stats.append(Stats())
        draft = Draft(self.draft, prompt=prompt, num_draft_tokens=self.num_draft_tokens)
        return draft.tokens(self.model, prompt, self.cache, settings, self.stats[-1],
                            image_features=features, compiled=self.compiled)

    def figures(self, results: list[dict], repeats: int) -> None:
        """Each result's `speculative` entry, from the runs after the warm-up, in order."""
        for i, entry in enumerate(results):
            runs = self.stats[1 + i * repeats:1 + (i + 1) * repeats]
            drafted = sum(s.drafted_tokens for s in runs)
            accepted = sum(s.accepted_tokens for s in runs)
            plain = entry["ours"]["decode_tps"]
            entry["speculative"] = {
                "acceptance_rate": accepted / drafted if drafted else 0.0,
                "drafted_tokens": drafted, "accepted_tokens": accepted,
                "speedup": entry["peer"]["decode_tps"] / plain if plain else 0.0}


class RepeatingConstraint(Constraint):
    """A constraint that starts its grammar again after each complete reply (a stop token),
    so that a benchmark's every token is constrained."""

    replies = 0

    def advance(self, token: int) -> None:
        if token in self.stop_ids:
            self.replies += 1
            self.reset()
            return
        super().advance(token)


class Constrained(Ours):
    """Our engine with a JSON-schema constraint; keeps each run's constraint (its mask time)."""

    def __init__(self, model: Model, grammar: Grammar, compiled: bool = True,
                 kv_bits: int | None = None, max_context: int | None = None):
        super().__init__(model, compiled, kv_bits, max_context, name="json schema")
        self.grammar = grammar
        self.constraints: list[RepeatingConstraint] = []  # every run's, warm-up first

    def tokens(self, prompt: list[int], max_tokens: int, pixel_values: mx.array | None = None):
        features = None
        if pixel_values is not None:
            features = self.model.net.encode_images(pixel_values)
            mx.eval(features)
        settings = SamplingSettings(temp=0.0, max_tokens=max_tokens)
        self.cache = self.model.make_cache(self.kv_bits)
        self.constraints.append(RepeatingConstraint(self.model, self.grammar))
        return generate_tokens(self.model, prompt, self.cache, settings, Stats(),
                               image_features=features, compiled=self.compiled,
                               constraint=self.constraints[-1])

    def figures(self, results: list[dict], repeats: int) -> None:
        """Each result's `constraint` entry, from the runs after the warm-up, in order."""
        for i, entry in enumerate(results):
            runs = self.constraints[1 + i * repeats:1 + (i + 1) * repeats]
            plain = entry["ours"]["decode_tps"]
            steps = sum(c.steps for c in runs)
            pairs = zip(entry["ours"]["runs"], entry["peer"]["runs"], strict=True)
            entry["constraint"] = {
                "decode_ratio": entry["peer"]["decode_tps"] / plain if plain else 0.0,
                "paired_ratio": statistics.median(b["decode_tps"] / a["decode_tps"]
                                                  for a, b in pairs if a["decode_tps"]),
                "mask_ms": 1e3 * sum(c.seconds for c in runs) / steps if steps else 0.0,
                "replies": sum(c.replies for c in runs)}


class MlxLm(Implementation):
    name = "mlx-lm"

    def __init__(self, ref: nn.Module):
        self.ref = ref

    def tokens(self, prompt: list[int], max_tokens: int, pixel_values: mx.array | None = None):
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        assert pixel_values is None, "mlx-lm takes text only"
        self.cache = make_prompt_cache(self.ref)
        for token, _ in generate_step(mx.array(prompt), self.ref, max_tokens=max_tokens,
                                      prompt_cache=self.cache):
            yield token


class MlxVlm(Implementation):
    """Driven by mlx-vlm's own `generate_step` with input ids, pixel values and the
    processor's all-ones attention mask, as its `stream_generate` calls it."""

    name = "mlx-vlm"

    def __init__(self, ref: nn.Module):
        self.ref = ref

    def tokens(self, prompt: list[int], max_tokens: int, pixel_values: mx.array | None = None):
        from mlx_vlm.generate import generate_step

        ids = mx.array(prompt)[None]
        mask = mx.ones(ids.shape, dtype=mx.int32)
        for token, _ in generate_step(ids, self.ref, pixel_values, mask, max_tokens=max_tokens,
                                      temperature=0.0):
            yield token


# ---- the measurement -------------------------------------------------------------------------

@dataclass
class Figures:
    prefill_tps: float
    decode_tps: float
    ttft_s: float
    peak_memory_bytes: int
    kv_cache_bytes: int
    generated_tokens: int
    runs: list[dict] = field(default_factory=list)

    @classmethod
    def median_of(cls, runs: list[Run], generated: int) -> Figures:
        med = {f: statistics.median(getattr(r, f) for r in runs) for f in FIGURES}
        return cls(med["prefill_tps"], med["decode_tps"], med["ttft_s"],
                   int(med["peak_memory_bytes"]), int(med["kv_cache_bytes"]), generated,
                   [asdict(r) for r in runs])


@dataclass
class ImagePrompt:
    """The one image each `--image` prompt holds. Its pixel values are random, uniform in
    [-1, 1] (the range of preprocessed pixels; the tower's work does not depend on them),
    [1, 3, size, size] at the config's image size, the same array for both sides; `ids` are
    the tokens it takes in the prompt: <start_of_image>, the soft tokens, <end_of_image>."""

    pixel_values: mx.array
    ids: list[int]

    @classmethod
    def of(cls, config: ModelConfig, seed: int = 0) -> ImagePrompt:
        size = config.vision.image_size
        pixels = mx.random.uniform(-1, 1, (1, 3, size, size), key=mx.random.key(seed))
        soft = [config.image_token_index] * config.mm_tokens_per_image
        return cls(pixels, [config.boi_token_index, *soft, config.eoi_token_index])


def prompt_ids(n: int, vocab: int, seed: int = 0, image: ImagePrompt | None = None) -> list[int]:
    """<bos>, the image's tokens if any, then random ordinary token ids up to n (below the
    image token 262144 and the special ones)."""
    key = mx.random.key(seed)
    high = min(vocab, 262_144)
    head = [2] + (image.ids if image else [])
    return head + mx.random.randint(1000 % high, high, (n - len(head),), key=key).tolist()


def measure(ours: Implementation, peer: Implementation | None, prompt_lengths: list[int],
            gen_tokens: int, repeats: int, vocab: int, progress: Any = None,
            image: ImagePrompt | None = None) -> list[dict]:
    impls = [ours] + ([peer] if peer is not None else [])
    pixels = image.pixel_values if image else None
    for impl in impls:  # warm-up: kernels, compiled functions, allocator
        impl.run(prompt_ids(16 + len(image.ids) if image else 16, vocab, image=image), 4, pixels)
    results = []
    for length in prompt_lengths:
        prompt = prompt_ids(length, vocab, image=image)
        runs: dict[str, list[Run]] = {impl.name: [] for impl in impls}
        for r in range(repeats):
            order = impls if r % 2 == 0 else impls[::-1]
            for impl in order:
                run = impl.run(prompt, gen_tokens, pixels)
                runs[impl.name].append(run)
                if progress:
                    progress(f"{impl.name} prompt {length}: ttft {run.ttft_s:.3f} s, "
                             f"decode {run.decode_tps:.1f} tok/s")
        entry: dict[str, Any] = {"prompt_tokens": length,
                                 "ours": asdict(Figures.median_of(runs[ours.name], gen_tokens)),
                                 "peer": None, "ratio": None}
        if peer is not None:
            theirs = Figures.median_of(runs[peer.name], gen_tokens)
            entry["peer"] = asdict(theirs)
            entry["ratio"] = {f: entry["ours"][f] / getattr(theirs, f)
                              for f in FIGURES if getattr(theirs, f)}
        results.append(entry)
    return results


def table(report: dict) -> str:
    peer = report["peer"]
    head = ["prompt", "impl", "prefill tok/s", "decode tok/s", "ttft s", "peak memory", "KV cache"]
    rows = []
    for entry in report["results"]:
        for label in ("ours", "peer", "ratio"):
            f = entry[label]
            if f is None:
                continue
            name = {"ours": "gemma-mlx", "peer": peer, "ratio": "ours/peer"}[label]
            size = (lambda x: f"{x:.2f}") if label == "ratio" else _size
            kv = size(f["kv_cache_bytes"]) if f.get("kv_cache_bytes") else "-"
            rows.append([str(entry["prompt_tokens"]), name, f"{f['prefill_tps']:.2f}",
                         f"{f['decode_tps']:.2f}", f"{f['ttft_s']:.3f}",
                         size(f["peak_memory_bytes"]), kv])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [f"{report['model']} on {report['device']} ({report['dtype']}), "
             f"{report['gen_tokens']} generated tokens, median of {report['repeats']}"
             + (", one image per prompt (its encoding in the ttft)" if report.get("image")
                else "")]
    for r in [head, *rows]:
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    for entry in report["results"]:
        con = entry.get("constraint")
        if con:
            lines.append(f"prompt {entry['prompt_tokens']}: with the JSON schema, decode "
                         f"{con['decode_ratio']:.3f}x of plain (paired "
                         f"{con['paired_ratio']:.3f}x), masks {con['mask_ms']:.2f} ms a token "
                         f"on the host, {con['replies']} complete replies")
        spec = entry.get("speculative")
        if spec:
            lines.append(f"prompt {entry['prompt_tokens']}: draft {report['draft']['model']} "
                         f"accepted {spec['acceptance_rate']:.0%} of {spec['drafted_tokens']} "
                         f"drafted tokens, decode speed-up {spec['speedup']:.2f}x")
    return "\n".join(lines)


# ---- the command -----------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gemma_mlx bench",
        description="Prefill and decode speed, time to first token and peak memory (medians).")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", "-m", default=None,
                        help="a model as the other commands take it (alias, repo, folder, .gguf)")
    source.add_argument("--random", choices=tuple(SHAPES), default=None,
                        help="a real-shape model with random 4-bit weights (no download)")
    p.add_argument("--prompt-tokens", default="512,4096",
                   help="comma-separated prompt lengths (default: 512,4096)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens to generate (128)")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure, median (3)")
    p.add_argument("--image", action="store_true",
                   help="each prompt holds one image (random pixels); its encoding through the "
                        "vision tower and projector counts in the time to first token")
    p.add_argument("--compare", choices=PEERS, default=None,
                   help="also run this implementation on the same weights, interleaved")
    p.add_argument("--kv-bits", type=int, choices=(4, 8), default=None,
                   help="our KV cache quantized to 8 or 4 bits; without --compare, measured "
                        "beside our full-precision cache")
    p.add_argument("--max-context", type=int, default=None, metavar="TOKENS",
                   help="we keep only this many tokens of longer prompts (as a conversation "
                        "drops its oldest turns); without --compare, measured beside the "
                        "whole context")
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="measure decoding constrained to this JSON schema beside plain decoding")
    p.add_argument("--draft-model", metavar="NAME", default=None,
                   help="measure speculative decoding with this draft model beside plain "
                        "decoding (with --random: a shape, random weights)")
    p.add_argument("--num-draft-tokens", type=int, default=None, metavar="N",
                   help="tokens drafted per step with --draft-model (default: 3)")
    p.add_argument("--no-compile", action="store_true",
                   help="decode op by op, as before compiling (to measure what compiling gives)")
    p.add_argument("--concurrency", metavar="N,N,...", default=None,
                   help="continuous batching: N streams at once (e.g. 1,4,8,16), each with "
                        "one --prompt-tokens length; aggregate and per-stream decode tok/s, "
                        "time to first token p50/p95, peak memory")
    p.add_argument("--dense-batch", action="store_true",
                   help="with --concurrency: batches of several streams step over dense copies "
                        "of the quantized weights (more memory)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    return p


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise BadRequest(f"--prompt-tokens takes comma-separated numbers (got {text!r})") from e
    if not lengths or min(lengths) < 2:
        raise BadRequest(f"--prompt-tokens needs lengths of at least 2 (got {text!r})")
    return lengths


def run_bench(argv: list[str], out: Any, err: Any) -> int:
    args = parser().parse_args(argv)
    lengths = parse_lengths(args.prompt_tokens)
    if args.concurrency is not None:
        return concurrency_bench(args, lengths, out, err)
    if args.gen_tokens < 2:
        raise BadRequest(f"--gen-tokens must be at least 2 (got {args.gen_tokens})")
    if args.repeats < 1:
        raise BadRequest(f"--repeats must be at least 1 (got {args.repeats})")
    if args.max_context is not None and (args.max_context < MIN_CONTEXT or args.image):
        raise BadRequest(f"--max-context takes at least {MIN_CONTEXT} tokens, and no --image "
                         "(the image would be the first thing dropped)")
    grammar = schema_file(args.json_schema) if args.json_schema is not None else None
    if grammar is not None and (args.compare is not None or args.draft_model is not None):
        raise BadRequest("--json-schema measures constrained against plain decoding of the "
                         "same model: leave out --compare and --draft-model")
    if args.draft_model is not None and args.compare is not None:
        raise BadRequest("--draft-model measures speculative against plain decoding of the same "
                         "model: leave out --compare")
    if args.num_draft_tokens is not None and args.draft_model is None:
        raise BadRequest("--num-draft-tokens needs --draft-model")
    if args.draft_model is not None and args.random and args.draft_model not in SHAPES:
        raise BadRequest(f"with --random, --draft-model is a shape too: one of "
                         f"{', '.join(SHAPES)} (got {args.draft_model})")
    if args.image and args.compare == "mlx-lm":
        raise BadRequest("--image needs --compare mlx-vlm (mlx-lm takes text only)")
    vlm_version = mlx_vlm_version() if args.compare == "mlx-vlm" else None
    if args.random:
        if args.image and args.random not in VISION_SHAPES:
            raise BadImage(f"--image needs a vision model, but {args.random} takes text only: "
                           "use --random 4b, 12b or 27b")
        # mlx-vlm's Gemma 3 has a tower even for text prompts: give it ours to share.
        vision = args.random in VISION_SHAPES and (args.image or vlm_version is not None)
        model = random_model(args.random, vision=vision)
    else:
        from .hub import DEFAULT_MODEL
        from .loading import load

        model = load(args.model or DEFAULT_MODEL)
    if grammar is not None and model.tokenizer is None:
        model.tokenizer = borrowed_tokenizer(model)
    image = None
    if args.image:
        if not model.config.has_vision:
            raise BadImage(f"--image needs a vision model, but {model.name} takes text only: "
                           "use 4b, 12b or 27b")
        image = ImagePrompt.of(model.config)
        if min(lengths) < len(image.ids) + 2:
            raise BadRequest(f"--image needs --prompt-tokens of at least {len(image.ids) + 2} "
                             f"(the image takes {len(image.ids)}; got {args.prompt_tokens})")
    text = model.config.text
    too_long = max(lengths) + args.gen_tokens
    if too_long > text.max_position_embeddings:
        raise BadRequest(f"prompt plus generated tokens ({too_long}) exceed the context window "
                         f"({text.max_position_embeddings})")
    if not args.no_compile:
        # Lays the q/k/v and gate/up weights out fused (in place, as views) before the peer
        # takes the same arrays, so both run on one copy of the weights.
        decode_program(model.net.decoder)
    compiled = not args.no_compile
    bounded = args.kv_bits is not None or args.max_context is not None
    peer: Implementation | None = None
    if args.compare == "mlx-lm":
        peer = MlxLm(mlx_lm_peer(model))
    elif args.compare == "mlx-vlm":
        peer = MlxVlm(mlx_vlm_peer(model))
    elif args.draft_model is not None:  # speculative decoding beside plain (same bounds)
        peer = speculative_peer(model, args, compiled)
    elif grammar is not None:
        peer = Constrained(model, grammar, compiled, args.kv_bits, args.max_context)
    elif bounded:  # what the bounds save: the same engine with the whole full-precision cache
        peer = Ours(model, compiled, name=FULL_CACHE)

    def progress(line: str) -> None:
        print(line, file=err, flush=True)

    from mlx_lm.generate import wired_limit  # Metal: keep the weights wired; no-op elsewhere

    with wired_limit(model.net):
        ours = Ours(model, compiled, args.kv_bits, args.max_context)
        results = measure(ours, peer, lengths, args.gen_tokens, args.repeats, text.vocab_size,
                          progress, image)
    for entry in results:
        entry["speculative"] = entry["constraint"] = None
    if isinstance(peer, (Speculative, Constrained)):
        peer.figures(results, args.repeats)
    import mlx_lm

    report = {
        "model": model.description, "device": str(mx.default_device()),
        "dtype": _float_dtype(model.net), "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
        "mlx_vlm": vlm_version, "image": args.image,
        "gen_tokens": args.gen_tokens, "repeats": args.repeats, "compiled": not args.no_compile,
        "kv_bits": args.kv_bits, "max_context": args.max_context,
        "peer": peer.name if peer else None,
        "draft": {"model": peer.draft.description, "num_draft_tokens": peer.num_draft_tokens}
        if isinstance(peer, Speculative) else None,
        "json_schema": args.json_schema,
        "results": results,
    }
    print(json.dumps(report) if args.json else table(report), file=out)
    return 0


def schema_file(path: str) -> Grammar:
    """The grammar of a JSON schema file (checked before any model loads)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise BadRequest(f"cannot read the JSON schema file {path} ({e.strerror}): check the "
                         "path") from e
    return json_schema(text, f"the JSON schema in {path}")


def borrowed_tokenizer(model: Model) -> Any:
    """A random model's tokenizer for constrained decoding: the 270M's (Gemma 3's), or the
    folder in $GEMMA_MLX_BENCH_TOKENIZER (machines without the 270M package)."""
    import os

    from .hub import resolve
    from .loading import load_tokenizer
    from .speculative import GEMMA3_VOCAB

    if model.config.text.vocab_size < GEMMA3_VOCAB:
        raise BadRequest(f"--json-schema needs Gemma's vocabulary, which {model.name} lacks: "
                         "use --random 270m or a larger shape, or --model")
    return load_tokenizer(resolve(os.environ.get("GEMMA_MLX_BENCH_TOKENIZER", "270m")))


def concurrency_bench(args: argparse.Namespace, lengths: list[int], out: Any, err: Any) -> int:
    from . import bench_concurrency as cb

    counts = cb.parse_streams(args.concurrency)
    if len(lengths) != 1:
        raise BadRequest("--concurrency takes one --prompt-tokens length (e.g. 256)")
    if args.gen_tokens < 2 or args.repeats < 1:
        raise BadRequest("--gen-tokens must be at least 2 and --repeats at least 1")
    for option in ("image", "draft_model", "kv_bits", "max_context", "no_compile", "json_schema"):
        if getattr(args, option):
            raise BadRequest(f"--concurrency does not combine with --{option.replace('_', '-')}")
    if args.compare not in (None, "mlx-lm"):
        raise BadRequest("--concurrency compares with --compare mlx-lm (its BatchGenerator)")
    if args.random:
        model = random_model(args.random)
    else:
        from .hub import DEFAULT_MODEL
        from .loading import load

        model = load(args.model or DEFAULT_MODEL)
    if lengths[0] + args.gen_tokens > model.config.text.max_position_embeddings:
        raise BadRequest("prompt plus generated tokens exceed the context window")
    decode_program(model.net.decoder)  # fuses in place before the peer shares the weights
    peer = cb.MlxLmBatched(mlx_lm_peer(model)) if args.compare == "mlx-lm" else None
    import mlx_lm
    from mlx_lm.generate import wired_limit

    with wired_limit(model.net):
        results = cb.measure(model, peer, counts, lengths[0], args.gen_tokens, args.repeats,
                             lambda line: print(line, file=err, flush=True), args.dense_batch)
    report = {"model": model.description, "device": str(mx.default_device()),
              "dtype": _float_dtype(model.net), "mlx": mx.__version__,
              "mlx_lm": mlx_lm.__version__, "prompt_tokens": lengths[0],
              "gen_tokens": args.gen_tokens, "repeats": args.repeats,
              "dense_batch": args.dense_batch, "peer": peer.name if peer else None,
              "concurrency": results}
    print(json.dumps(report) if args.json else cb.table(report), file=out)
    return 0


def speculative_peer(model: Model, args: argparse.Namespace, compiled: bool) -> Speculative:
    """The draft: a random model of that shape (with --random), or loaded; the model's own
    name or shape is the model itself."""
    n = DEFAULT_NUM_DRAFT_TOKENS if args.num_draft_tokens is None else args.num_draft_tokens
    check_num_draft_tokens(n)
    if args.random:
        draft = model if args.draft_model == args.random else random_model(args.draft_model)
        check_draft(model, draft)
    else:
        draft = load_draft(args.draft_model, model)
    return Speculative(model, draft, n, compiled, args.kv_bits, args.max_context)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def _float_dtype(net: nn.Module) -> str:
    for _, v in tree_flatten(net.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return str(v.dtype).removeprefix("mlx.core.")
    return "?"

