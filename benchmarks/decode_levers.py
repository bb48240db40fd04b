"""Decode levers, one by one, on a random real-shape model (run where the speed matters).

    python benchmarks/decode_levers.py --shape 4b [--prompt 512] [--steps 100] [--json OUT]
        [--variants plain,compiled,compiled-unfused,mlx-lm] [--chunks 512,1024,2048,4096]

For each variant: the Python time to build one step's graph, the synchronous step time (build,
evaluate, read the token) and the pipelined rate (`mx.async_eval` one step ahead, as the engine
decodes), one entry per interleaved round (--rounds). Variants:
  plain            the model op by op on mlx-lm's caches (our decode before compiling)
  compiled         `model.decode.compiled_decode`: the whole step as one compiled graph, q/k/v
                   and gate/up fused into one quantized matmul each
  compiled-unfused the same graph with the seven projections kept apart
  mlx-lm           mlx-lm's Gemma 3 on the same weights, op by op
It first checks the compiled step's logits against the plain step's (same tokens fed), and
last times prefill of a 4096-token prompt at several chunk sizes, with peak memory.
MLX's CUDA command batching (MLX_MAX_OPS_PER_BUFFER, MLX_MAX_MB_PER_BUFFER) is read once per
process: compare settings by running this script under each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback

import mlx.core as mx

from gemma_mlx.bench import mlx_lm_peer, prompt_ids, random_model
from gemma_mlx.engine import prefill
from gemma_mlx.model.decode import CompiledDecode, compiled_decode, decode_program


class UnfusedDecode(CompiledDecode):
    """CompiledDecode with each projection its own quantized matmul (the fusion lever off)."""

    def __init__(self, decoder):
        super().__init__(decoder)
        self.qkv = [[(m, [m.weight.shape[0]]) for m in
                     (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj)]
                    for b in decoder.layers]
        self.gate_up = [[(m, [m.weight.shape[0]]) for m in (b.mlp.gate_proj, b.mlp.up_proj)]
                        for b in decoder.layers]
        self._fn = mx.compile(self._step)


def timed_decode(step, token: mx.array, steps: int) -> dict:
    """step(token) -> next token array (lazy). Build time, sync step time, pipelined rate."""
    build, sync = [], []
    for _ in range(max(steps // 4, 5)):
        t0 = time.perf_counter()
        nxt = step(token)
        t1 = time.perf_counter()
        nxt.item()
        t2 = time.perf_counter()
        build.append(t1 - t0)
        sync.append(t2 - t0)
        token = nxt
    token = step(token)
    mx.async_eval(token)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = step(token)
        mx.async_eval(nxt)
        token.item()
        token = nxt
    token.item()
    rate = steps / (time.perf_counter() - t0)
    return {"build_ms": 1e3 * statistics.median(build), "sync_ms": 1e3 * statistics.median(sync),
            "pipelined_tps": rate}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="4b")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--variants", default="plain,compiled,compiled-unfused,mlx-lm")
    p.add_argument("--chunks", default="512,1024,2048,4096", help="'' to skip")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the variants")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    env = {k: os.environ.get(k) for k in ("MLX_MAX_OPS_PER_BUFFER", "MLX_MAX_MB_PER_BUFFER")}
    report: dict = {"shape": args.shape, "device": str(mx.default_device()), "env": env,
                    "variants": {}}
    print("env", env, flush=True)
    model = random_model(args.shape)
    net, vocab = model.net, model.config.text.vocab_size
    decode_program(net.decoder)  # fuse in place first, so the peer shares the same arrays
    ref = mlx_lm_peer(model)
    ids = prompt_ids(args.prompt, vocab)
    greedy = lambda logits: mx.argmax(logits, axis=-1).astype(mx.int32).reshape(1)  # noqa: E731

    def fresh_cache():
        cache = model.make_cache()
        logits = prefill(model, ids, cache)
        return cache, greedy(logits)

    if not args.no_check:  # compiled logits against plain ones, fed the same greedy tokens
        try:
            c_plain, tok = fresh_cache()
            c_fast, _ = fresh_cache()
            fast = compiled_decode(net.decoder, c_fast)
            worst, agree, n = 0.0, 0, 60
            for _ in range(n):
                a = net.logits(net.hidden(tok[None], c_plain)[:, -1, :])[0]
                b = fast.step(tok, c_fast)
                scale = mx.abs(a).max().item()
                diff = mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()
                worst = max(worst, diff / scale)
                agree += int(greedy(a).item() == greedy(b).item())
                tok = greedy(a)
            report["check"] = {"max_rel_logit_diff": worst, "greedy_agree": f"{agree}/{n}"}
            print("check", report["check"], flush=True)
        except Exception:
            traceback.print_exc()

    def plain_step(cache):
        return lambda t: greedy(net.logits(net.hidden(t[None], cache)[:, -1, :])[0])

    def compiled_step(cache, cls=None):
        fast = cls(net.decoder) if cls else decode_program(net.decoder)
        fast.prepare(cache)
        return lambda t: greedy(fast.step(t, cache))

    def mlx_lm_step(cache):
        return lambda t: greedy(ref(t[None], cache=cache)[0, -1])

    makers = {"plain": plain_step, "compiled": compiled_step,
              "compiled-unfused": lambda c: compiled_step(c, UnfusedDecode),
              "mlx-lm": mlx_lm_step}
    for round_ in range(args.rounds):
        for name in args.variants.split(","):
            try:
                if name == "mlx-lm":
                    cache = ref.make_cache()
                    tok = greedy(ref(mx.array(ids)[None], cache=cache)[0, -1])
                else:
                    cache, tok = fresh_cache()
                r = timed_decode(makers[name](cache), tok, args.steps)
                report["variants"].setdefault(name, []).append(r)
                print(round_, name, {k: round(v, 3) for k, v in r.items()}, flush=True)
            except Exception:
                traceback.print_exc()
            del cache
            mx.clear_cache()

    chunks: dict = {}
    long_ids = prompt_ids(4096, vocab)
    for rep in range(2):
        for chunk in [int(c) for c in args.chunks.split(",") if c]:
            try:
                cache = model.make_cache()
                mx.clear_cache()
                mx.reset_peak_memory()
                t0 = time.perf_counter()
                mx.eval(prefill(model, long_ids, cache, chunk=chunk))
                tps = 4096 / (time.perf_counter() - t0)
                chunks.setdefault(chunk, []).append((tps, mx.get_peak_memory() / 2**30))
                print(rep, "prefill 4096 chunk", chunk, f"{tps:.0f} tok/s",
                      f"peak {chunks[chunk][-1][1]:.2f} GB", flush=True)
                del cache
            except Exception:
                traceback.print_exc()
    report["prefill_4096_by_chunk"] = chunks
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
