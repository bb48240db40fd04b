"""Decode speed inside the chat app against `gemma_mlx.stream` on its own.

Same model, same prompt tokens (the app's first turn and `stream(..., raw=False)` both use the
chat template), greedy, a fixed max_tokens. The app runs headless (`App.run_test`), streaming
into its Markdown view and status bar as it does in a terminal. Runs alternate (direct, app,
direct, app, ...) so that a busy machine slows both alike; the medians are compared.

    python benchmarks/tui_vs_cli.py                      # 270m, 48 tokens, 3 rounds
    python benchmarks/tui_vs_cli.py --model 1b --max-tokens 128 --rounds 5
    python benchmarks/tui_vs_cli.py --model tiny --max-tokens 500   # a fast random model:
                                                  # hundreds of tok/s stress the UI path
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gemma_mlx  # noqa: E402
from tui.app import ChatApp  # noqa: E402
from tui.widgets import Composer  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def direct(model: gemma_mlx.Model, prompt: str, max_tokens: int) -> gemma_mlx.Stats:
    stats = None
    for chunk in gemma_mlx.stream(model, prompt, raw=False, temp=0.0, max_tokens=max_tokens):
        stats = chunk.stats
    assert stats is not None
    return stats


def tiny_random_model() -> gemma_mlx.Model:
    """Two layers of hidden size 64 with the real tokenizer: decodes far faster than any real
    model, so the app's own cost per token shows. (A benchmark may use internals.)"""
    import mlx.core as mx

    from gemma_mlx.config import ModelConfig
    from gemma_mlx.hub import resolve
    from gemma_mlx.loading import Model, load_tokenizer
    from gemma_mlx.model.gemma3 import Gemma3

    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=262208,
                sliding_window=16, max_position_embeddings=4096)
    mx.random.seed(0)
    net = Gemma3(ModelConfig.from_dict({"model_type": "gemma3_text", **text}))
    mx.eval(net.parameters())
    folder = resolve("270m")
    return Model(net, load_tokenizer(folder), folder, None, name="tiny-random")


class TimedApp(ChatApp):
    """The chat app, telling the benchmark when the reply is done."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.done = asyncio.Event()

    async def on_reply_finished(self, message) -> None:
        await super().on_reply_finished(message)
        self.done.set()


async def in_app(model: gemma_mlx.Model, prompt: str, max_tokens: int) -> gemma_mlx.Stats:
    app = TimedApp(model, sampling=dict(temp=0.0, max_tokens=max_tokens), graphics="halfcell")
    async with app.run_test(size=(120, 40)) as pilot:
        app.query_one(Composer).set_text(prompt)
        await pilot.press("enter")
        await asyncio.wait_for(app.done.wait(), timeout=3600)
        assert app.last_stats is not None
        return app.last_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="270m")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args()

    model = tiny_random_model() if args.model == "tiny" else gemma_mlx.load(args.model)
    direct(model, args.prompt, 4)  # warm up: first-call allocations and kernels
    speeds: dict[str, list[float]] = {"direct": [], "app": []}
    for i in range(args.rounds):
        for name in ("direct", "app"):
            if name == "direct":
                stats = direct(model, args.prompt, args.max_tokens)
            else:
                stats = asyncio.run(in_app(model, args.prompt, args.max_tokens))
            speeds[name].append(stats.decode_tps)
            print(f"round {i + 1} {name:>6}: {stats.generated_tokens} tok, decode "
                  f"{stats.decode_tps:.2f} tok/s, first token {stats.time_to_first_token:.2f} s",
                  flush=True)
    app, plain = statistics.median(speeds["app"]), statistics.median(speeds["direct"])
    print(f"{model.description}, {args.max_tokens} tokens, greedy, median of {args.rounds}: "
          f"direct {plain:.2f} tok/s, in the app {app:.2f} tok/s, ratio {app / plain:.3f}")


if __name__ == "__main__":
    main()
