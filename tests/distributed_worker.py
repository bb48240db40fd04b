"""One rank of the distributed tests (tests/test_distributed.py starts two, with MLX_RANK and
MLX_HOSTFILE): `python distributed_worker.py CASES.json OUT_DIR`.

- Logits cases (every rank alike, as a script run on every rank would): load a tiny checkpoint
  with `distributed=...`, and record the logits of a prompt (prefill), of a few fed tokens
  (the compiled step where it applies) and the greedy tokens `generate_tokens` picks.
  `case_outputs` is also the test's single-process reference.
- The chat case: rank 0 leads a Chat (images, follow-ups, undo, a stop, a reply cut off by
  its reader, a JSON schema, sampling, an 8-bit KV cache) while rank 1 follows (lockstep.py);
  then rank 0 replays it on one machine.
- The greedy case: the real 270M's greedy tokens in each mode.
- The killed case: a long generation under `watchdog.supervise`, until the test kills a rank.
Each rank writes rank{N}.json (and rank{N}.npz for logits) into OUT_DIR.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

PROMPT = [2, 17, 33, 41, 5, 60, 71, 82, 93, 104, 115, 126, 137, 148, 159, 170, 181, 192, 203,
          214]  # longer than the tiny window (8): the sliding layers' masks matter
FED = [7, 300, 42, 9, 123, 55]  # tokens fed one at a time after the prompt
IMAGE = dict(boi=498, eoi=499, image=500, per_image=4)  # the tiny vision configs' ids


def prompt_ids(case: dict) -> list[int]:
    if not case.get("image"):
        return PROMPT
    block = [IMAGE["boi"]] + [IMAGE["image"]] * IMAGE["per_image"] + [IMAGE["eoi"]]
    return PROMPT[:5] + block + PROMPT[5:]


def pixels() -> mx.array:
    return mx.random.uniform(shape=(1, 3, 28, 28), key=mx.random.key(7))


def load_case(case: dict, distributed: bool):
    from gemma_mlx.loading import load

    options = dict(quantize=case.get("quantize", False), tokenizer=False)
    if distributed:
        options.update(distributed=case["mode"], pipeline_split=case.get("split"),
                       join_timeout=30)
    return load(case["folder"], **options)


def case_outputs(model, case: dict) -> tuple[np.ndarray, list[int], bool]:
    """Logits [prompt + fed, vocab], 6 greedy tokens, and whether the fed tokens went through
    the compiled step."""
    from gemma_mlx.engine import SamplingSettings, Stats, generate_tokens
    from gemma_mlx.model.decode import compiled_decode

    ids = prompt_ids(case)
    features = model.net.encode_images(pixels()) if case.get("image") else None
    cache = model.make_cache(case.get("kv_bits"))
    h = model.net.hidden(mx.array([ids]), cache, features)
    rows = [model.net.logits(h)[0]]
    fast = compiled_decode(model.net.decoder, cache)
    for token in FED:
        t = mx.array([token])
        step = fast.step(t, cache) if fast is not None else model(t[None], cache)[0, -1]
        rows.append(step[None])
    logits = np.array(mx.concatenate(rows))
    tokens = list(generate_tokens(model, ids, model.make_cache(case.get("kv_bits")),
                                  SamplingSettings(temp=0.0, max_tokens=6), Stats(),
                                  image_features=features))
    return logits, tokens, fast is not None


def logits_cases(cases: list[dict], out: Path, rank: int) -> None:
    from gemma_mlx.errors import GemmaError
    from gemma_mlx.loading import parameter_bytes

    arrays, report = {}, {}
    for case in cases:
        gc.collect()  # the last case's model is gone: this load's peak is its own
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        try:
            model = load_case(case, distributed=True)
        except GemmaError as e:
            report[case["name"]] = {"error": f"{type(e).__name__}: {e}"}
            continue
        held = {"weights": parameter_bytes(model.net),
                "loaded_peak": mx.get_peak_memory() - before,
                "layers": [i for i, b in enumerate(model.net.decoder.layers) if b is not None],
                "vision": "vision_tower" in model.net}
        logits, tokens, compiled = case_outputs(model, case)
        arrays[case["name"]] = logits
        report[case["name"]] = {"tokens": tokens, "compiled": compiled, **held}
        del model
    np.savez(out / f"rank{rank}.npz", **arrays)
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def conversation(model) -> list[str]:
    """A Chat with everything the lockstep must mirror, and the one-message functions."""
    from PIL import Image

    import gemma_mlx

    picture = Image.fromarray((np.array(pixels())[0].transpose(1, 2, 0) * 255).astype(np.uint8))
    chat = gemma_mlx.Chat(model, temp=0, max_tokens=5)
    replies = [chat.send("What is this?", images=[picture]), chat.send("And then?")]
    chat.undo()  # the cache is trimmed back (or made afresh) on every rank alike
    replies.append(chat.send("Something else."))
    steps = 0

    def enough() -> bool:
        nonlocal steps
        steps += 1
        return steps > 2

    replies.append("".join(c.text for c in chat.stream("Stop soon.", should_stop=enough)))
    for i, _ in enumerate(chat.stream("Cut me off.")):  # the reader stops reading
        if i == 1:
            break
    replies.append(chat.send("Last one.", max_tokens=4))
    replies.append(chat.send("As JSON.", json_schema={"type": "object"}, max_tokens=6))
    replies.append(gemma_mlx.generate(model, "Once", raw=True, max_tokens=5, temp=0.8,
                                      seed=3, kv_bits=8))
    return replies


def chat_case(case: dict, out: Path, rank: int) -> None:
    from gemma_mlx.distributed import start_group
    from gemma_mlx.loading import load
    from gemma_mlx.lockstep import follow, leading

    group = start_group(30)
    if rank != 0:
        model = load(case["folder"], distributed=case["mode"], tokenizer=False)
        (out / f"rank{rank}.json").write_text(json.dumps({"followed": follow(model)}))
        return
    with leading(group) as leader:
        model = load(case["folder"], distributed=case["mode"])
        leader.attach(model)
        replies = conversation(model)
    here = load(case["folder"], tokenizer=False)
    here.tokenizer = model.tokenizer
    (out / "rank0.json").write_text(json.dumps({"distributed": replies,
                                                "one_machine": conversation(here)}))


def greedy_case(cases: list[dict], out: Path, rank: int) -> None:
    """The 270M's greedy tokens for each mode, no tokenizer needed (the test encodes)."""
    from gemma_mlx.engine import SamplingSettings, Stats, generate_tokens
    from gemma_mlx.loading import load

    report = {}
    for case in cases:
        model = load(case["folder"], distributed=case["mode"], tokenizer=False)
        report[case["mode"]] = list(generate_tokens(
            model, case["ids"], model.make_cache(), SamplingSettings(temp=0.0, max_tokens=6),
            Stats()))
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def generate_until_killed(case: dict) -> None:
    """A long generation, as a script on every rank runs it under `supervise`: rank 0 says
    when it has started; the test kills a rank then."""
    from gemma_mlx.engine import SamplingSettings, Stats, generate_tokens

    model = load_case(case, distributed=True)
    tokens = generate_tokens(model, PROMPT, model.make_cache(),
                             SamplingSettings(temp=0.0, max_tokens=20_000), Stats())
    for n, _ in enumerate(tokens):
        if n == 1 and model.sharding.rank == 0:
            print("generating", flush=True)


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    from gemma_mlx.distributed import start_group
    from gemma_mlx.watchdog import supervise

    kind = cases[0].get("kind", "logits")
    if kind == "killed":
        supervise(30)  # the script's way to end cleanly when a rank dies
    rank = start_group(30).rank()
    if kind == "chat":
        chat_case(cases[0], out, rank)
    elif kind == "greedy":
        greedy_case(cases, out, rank)
    elif kind == "killed":
        generate_until_killed(cases[0])
    else:
        logits_cases(cases, out, rank)


if __name__ == "__main__":
    main()
