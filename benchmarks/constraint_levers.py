"""Where constrained decoding's time goes on a fast device (a measurement script, run by hand).

The engine's constrained loop (engine._constrained) beside variants of it, on a random
real-shape model with Gemma's tokenizer and a JSON schema (as `bench --json-schema`): decode
tok/s of each, interleaved run by run, and for the profiled ones the host's time per token in
each phase (reading the token, advancing the grammar, its mask, queueing the sampling,
queueing the forward pass). A host-bound step (kernel launches) shows every microsecond the
host adds; a device-bound one hides it.

    GEMMA_MLX_BENCH_TOKENIZER=DIR python benchmarks/constraint_levers.py --shape 4b --json out.json

Variants (each a drop-in for engine._constrained):
  plain            no constraint (the engine's plain loop)
  engine           the engine's constrained loop
  uploaded-each-step  the engine's loop with every mask uploaded, none kept on the device
  plain-profiled   the plain loop's order, phases timed (the grammar is not used)
  engine-profiled  the engine's loop, phases timed, every mask uploaded
  merged           the sampling of n+1 and the pass of n+2 queued in one async_eval
  constant-mask    the engine's order with one all-allowed mask (no grammar work)
  upload-only      the engine's order, a mask uploaded and unpacked each step (no grammar work)
  reader-thread    a worker thread reads each token and computes the next mask while the
                   main thread queues the forward pass (MLX's async_eval releases the GIL)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from gemma_mlx import constrain, engine  # noqa: E402
from gemma_mlx.bench import (  # noqa: E402
    Constrained,
    Ours,
    borrowed_tokenizer,
    prompt_ids,
    random_model,
    schema_file,
)
from gemma_mlx.constrain import _unpack  # noqa: E402
from gemma_mlx.model.decode import decode_program  # noqa: E402

PHASES: dict[str, float] = defaultdict(float)
clock = time.perf_counter


def plain_profiled(token, forward, sample, constraint, max_tokens, stats):
    for n in range(max_tokens):
        t0 = clock()
        if n + 1 < max_tokens:
            next_token = sample(forward(token))
            mx.async_eval(next_token)
        t1 = clock()
        t = token.item()
        PHASES["queue step"] += t1 - t0
        PHASES["read token"] += clock() - t1
        PHASES["tokens"] += 1
        yield t
        if n + 1 < max_tokens:
            token = next_token


def engine_profiled(token, forward, sample, constraint, max_tokens, stats):
    logits = forward(token) if max_tokens > 1 else None
    if logits is not None:
        mx.async_eval(logits)
    for n in range(max_tokens):
        t0 = clock()
        t = token.item()
        t1 = clock()
        constraint.advance(t)
        t2 = clock()
        if n + 1 < max_tokens:
            allowed = constraint.mask()
            t3 = clock()
            token = sample(logits, allowed)
            mx.async_eval(token)
            t4 = clock()
            logits = forward(token) if n + 2 < max_tokens else None
            if logits is not None:
                mx.async_eval(logits)
            t5 = clock()
            PHASES["mask"] += t3 - t2
            PHASES["queue sample"] += t4 - t3
            PHASES["queue forward"] += t5 - t4
        PHASES["read token"] += t1 - t0
        PHASES["advance"] += t2 - t1
        PHASES["tokens"] += 1
        yield t


def merged(token, forward, sample, constraint, max_tokens, stats):
    logits = forward(token) if max_tokens > 1 else None
    if logits is not None:
        mx.async_eval(logits)
    for n in range(max_tokens):
        t = token.item()
        constraint.advance(t)
        if n + 1 < max_tokens:
            token = sample(logits, constraint.mask())
            logits = forward(token) if n + 2 < max_tokens else None
            mx.async_eval(token, *([logits] if logits is not None else []))
        yield t


def _unconstrained(masks):
    """The engine's order with masks from `masks()` and no grammar work."""
    def loop(token, forward, sample, constraint, max_tokens, stats):
        logits = forward(token) if max_tokens > 1 else None
        if logits is not None:
            mx.async_eval(logits)
        for n in range(max_tokens):
            t = token.item()
            if n + 1 < max_tokens:
                token = sample(logits, masks(constraint))
                mx.async_eval(token)
                logits = forward(token) if n + 2 < max_tokens else None
                if logits is not None:
                    mx.async_eval(logits)
            yield t
    return loop


def _uploading_every_mask(loop):
    """`loop` with no mask kept on the device (Constraint keeps none when KEPT_MASKS is 0):
    every step's mask uploaded, as before Constraint kept its recent ones."""
    def uploading(*args):
        kept, constrain.KEPT_MASKS = constrain.KEPT_MASKS, 0
        try:
            yield from loop(*args)
        finally:
            constrain.KEPT_MASKS = kept
    return uploading


_ALL: dict[int, mx.array] = {}


def _all_allowed(constraint):
    if constraint.vocab not in _ALL:
        _ALL[constraint.vocab] = mx.ones((constraint.vocab,), mx.bool_)
    return _ALL[constraint.vocab]


def _uploaded(constraint):
    words = np.full((constraint.vocab + 31) // 32, -1, dtype=np.int32)
    return _unpack(mx.array(words.view(np.uint32)))[:constraint.vocab]


_READER = ThreadPoolExecutor(1, thread_name_prefix="token-reader")


def reader_thread(token, forward, sample, constraint, max_tokens, stats):
    def read(array, fill: bool):
        t = array.item()
        constraint.advance(t)
        if not fill:
            return t, None
        constraint._fill()
        return t, constraint._bits.copy()

    logits = forward(token) if max_tokens > 1 else None
    if logits is not None:
        mx.async_eval(logits)
    pending = _READER.submit(read, token, max_tokens > 1)
    for n in range(max_tokens):
        t, bits = pending.result()
        if n + 1 < max_tokens:
            allowed = _unpack(mx.array(bits.view(np.uint32)))[:constraint.vocab]
            token = sample(logits, allowed)
            mx.async_eval(token)
            pending = _READER.submit(read, token, n + 2 < max_tokens)
            logits = forward(token) if n + 2 < max_tokens else None
            if logits is not None:
                mx.async_eval(logits)
        yield t


VARIANTS = {
    "engine": engine._constrained,
    "uploaded-each-step": _uploading_every_mask(engine._constrained),
    "plain-profiled": plain_profiled,
    "engine-profiled": _uploading_every_mask(engine_profiled),
    "merged": merged,
    "constant-mask": _unconstrained(_all_allowed),
    "upload-only": _unconstrained(_uploaded),
    "reader-thread": reader_thread,
}


class Variant(Constrained):
    def __init__(self, model, grammar, name, loop):
        super().__init__(model, grammar)
        self.name, self.loop = name, loop

    def tokens(self, prompt, max_tokens, pixel_values=None):
        engine._constrained = self.loop
        return super().tokens(prompt, max_tokens, pixel_values)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4b")
    parser.add_argument("--schema", default=str(ROOT / "benchmarks/schemas/records.json"))
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default=",".join(["plain", *VARIANTS]))
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    model = random_model(args.shape)
    model.tokenizer = borrowed_tokenizer(model)
    decode_program(model.net.decoder)
    grammar = schema_file(args.schema)
    original = engine._constrained
    impls = [Ours(model, name="plain") if v == "plain" else Variant(model, grammar, v, VARIANTS[v])
             for v in args.variants.split(",")]
    prompt = prompt_ids(args.prompt_tokens, model.config.text.vocab_size)
    runs: dict[str, list[float]] = defaultdict(list)
    phases: dict[str, dict[str, float]] = {}
    for impl in impls:  # warm-up
        impl.run(prompt_ids(16, model.config.text.vocab_size), 8)
    for r in range(args.repeats):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            PHASES.clear()
            run = impl.run(prompt, args.gen_tokens)
            runs[impl.name].append(run.decode_tps)
            if PHASES:
                count = PHASES.pop("tokens")
                mine = phases.setdefault(impl.name, defaultdict(float))
                for key, value in PHASES.items():
                    mine[key] += 1e3 * value / count / args.repeats
            print(f"{impl.name}: {run.decode_tps:.1f} tok/s", flush=True)
    engine._constrained = original
    plain = statistics.median(runs["plain"]) if "plain" in runs else None
    report = {"model": model.description, "device": str(mx.default_device()),
              "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
              "repeats": args.repeats, "variants": {}}
    for name, values in runs.items():
        median = statistics.median(values)
        report["variants"][name] = {
            "decode_tps": median, "runs": values,
            "ratio_to_plain": median / plain if plain else None,
            "host_ms_per_token": dict(phases.get(name, {}))}
        line = f"{name:16s} {median:7.1f} tok/s"
        if plain:
            line += f"  {median / plain:.3f}x plain"
        if name in phases:
            line += "  " + ", ".join(f"{k} {v:.3f} ms" for k, v in phases[name].items())
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
