"""A conversation grown turn by turn on a random real-shape model: the driver shared by
conversation_memory.py and followup_ttft.py (not a benchmark by itself).

Each turn is a real `gemma_mlx.Chat` turn: the whole conversation is tokenized, the cached
prefix is kept and only the new tokens are prefilled, the reply is generated greedily and then
replayed as its own tokens next turn. A random model (`gemma_mlx.bench.random_model`) has no
tokenizer, so by default it gets `WordTokenizer`: one token per word, the Gemma special tokens
at their real ids. Only the text-to-ids step differs from a real checkpoint; a real Gemma 3
tokenizer can be given instead (`--tokenizer 270m` or a folder with tokenizer.json: every
Gemma 3 size shares one tokenizer).
"""

from __future__ import annotations

import os
import re
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from gemma_mlx import Chat
from gemma_mlx.bench import SHAPES, random_model
from gemma_mlx.chat import Message
from gemma_mlx.loading import Model, parameter_bytes
from gemma_mlx.model.decode import compiled_decode, decode_program

SPECIAL = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106}
FIRST_WORD_ID = 1000  # word ids start above the special and control tokens (tiny vocabularies:
# at a quarter of the vocabulary)
WORDS = ("the model keeps every token of the conversation in its cache so a new turn only "
         "prefills what was added since the last reply and the time to the first token "
         "should stay flat while memory grows with the context").split()


class WordTokenizer:
    """Just what Chat and the engine ask of a tokenizer: special tokens at Gemma's ids, every
    other word (with its leading space) one id from a stable hash, decode by a table of the ids
    seen (generated ids print as `w<id>`). Deterministic across processes."""

    def __init__(self, vocab_size: int):
        self.high = min(vocab_size, 262_144)  # below the image token and the unused ids
        self.low = min(FIRST_WORD_ID, self.high // 4)
        if self.high - self.low < 16 or self.low <= max(SPECIAL.values()):
            raise ValueError(f"vocabulary of {vocab_size} too small for word ids")
        self.bos_token_id = SPECIAL["<bos>"]
        self.eos_token_ids = [SPECIAL["<eos>"], SPECIAL["<end_of_turn>"]]
        self.chat_template = None
        self._split = re.compile("(" + "|".join(map(re.escape, SPECIAL)) + ")")
        self._pieces: dict[int, str] = {v: k for k, v in SPECIAL.items()}
        self.detokenizer = _Detokenizer(self)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens else []
        for part in self._split.split(text):
            if part in SPECIAL:
                ids.append(SPECIAL[part])
                continue
            for piece in re.findall(r"\s*\S+|\s+", part):
                i = self.low + zlib.crc32(piece.encode()) % (self.high - self.low)
                self._pieces.setdefault(i, piece)
                ids.append(i)
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self._pieces.get(i, f" w{i}") for i in ids)


class _Detokenizer:
    """The streaming detokenizer's interface (mlx-lm's): reset, add_token, last_segment."""

    def __init__(self, tokenizer: WordTokenizer):
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self._pending: list[int] = []

    def add_token(self, token: int) -> None:
        self._pending.append(token)

    def finalize(self) -> None:
        pass

    @property
    def last_segment(self) -> str:
        text, self._pending = self.tokenizer.decode(self._pending), []
        return text


def build_model(shape: str, tokenizer: str = "words") -> Model:
    """A random real-shape model with a tokenizer: `words` (WordTokenizer), a model alias
    (e.g. `270m`: its tokenizer) or a folder holding tokenizer.json."""
    model = random_model(shape)
    vocab = model.config.text.vocab_size
    if tokenizer == "words":
        model.tokenizer = WordTokenizer(vocab)
    else:
        if vocab < 262_144:
            raise SystemExit(f"--tokenizer {tokenizer}: the {shape} shape's vocabulary ({vocab})"
                             " is smaller than Gemma's; use the default `words`")
        if Path(tokenizer).is_dir():
            from gemma_mlx.loading import load_tokenizer

            model.tokenizer = load_tokenizer(Path(tokenizer))
        else:
            import gemma_mlx

            model.tokenizer = gemma_mlx.load(tokenizer).tokenizer
    # Fuse the q/k/v and gate/up weights now (in place, as views), as the first decode would:
    # the weights are then laid out as they stay, and an mlx-lm peer can share the arrays.
    decode_program(model.net.decoder)
    return model


def user_text(tokenizer: Any, n_tokens: int, turn: int) -> str:
    """A user message of about `n_tokens` tokens (exactly, with WordTokenizer)."""
    words: list[str] = []
    i = turn * 7
    while True:
        words.append(WORDS[i % len(WORDS)] + (str(turn) if i % 11 == 0 else ""))
        i += 1
        if isinstance(tokenizer, WordTokenizer):
            if len(words) >= n_tokens:
                return " ".join(words)
        elif len(tokenizer.encode(" ".join(words))) >= n_tokens:
            return " ".join(words)


def cache_bytes(cache: list | None) -> tuple[int, int]:
    """(bytes the cache's arrays hold, bytes of the tokens they hold): the first counts the
    unused capacity too (a KVCache grows in steps; the compiled decode reserves 512 ahead)."""
    held = used = 0
    for c in cache or []:
        arrays = [a for _, a in tree_flatten([c.keys, c.values]) if isinstance(a, mx.array)]
        size = sum(a.nbytes for a in arrays)
        slots = c.keys[0].shape[2] if isinstance(c.keys, tuple) else c.keys.shape[2]
        tokens = min(c.offset, getattr(c, "max_size", None) or c.offset)
        held += size
        used += size * min(tokens, slots) // slots if slots else 0
    return held, used


@dataclass
class Turn:
    turn: int
    context_tokens: int  # tokens in the cache after the turn (the conversation so far)
    prompt_tokens: int  # the whole conversation as this turn's prompt
    prefilled_tokens: int  # what this turn actually prefilled (the rest came from the cache)
    generated_tokens: int
    finish_reason: str | None
    ttft_s: float  # from chat.stream() to the first chunk: tokenizing, cache reuse, prefill
    engine_ttft_s: float  # the engine's own figure (prefill plus the first sampled token)
    turn_s: float
    decode_tps: float
    peak_to_first_token_bytes: int  # MLX peak memory from the turn's start to its first token
    peak_memory_bytes: int  # MLX peak memory over the whole turn
    active_memory_bytes: int  # after the turn
    cache_memory_bytes: int  # MLX's allocator cache after the turn (freed buffers kept)
    weights_bytes: int
    kv_cache_bytes: int  # the cache arrays' nbytes (capacity included)
    kv_used_bytes: int  # of which the tokens they hold
    peak_ratio: float  # peak / (weights + kv_cache_bytes)
    last: bool  # no further turn fits the target context


def fast_forward(chat: Chat, tokens: int, user_tokens: int, reply_tokens: int) -> int:
    """Give `chat` a past of at most `tokens` tokens without running the model: turns of the
    usual sizes (replies as token ids) and a KV cache of their length filled with random keys
    and values, laid out as after a reply. A later turn's time and memory depend on the cache's
    size, not its values: this lets a slow machine measure turns at a long context. Uses Chat's
    internals (there is no public way to hand it a cache). Returns the number of turns."""
    model, tok = chat.model, chat.model.tokenizer
    messages: list[Message] = []
    while True:
        n = len(messages) // 2
        reply = tok.encode(" " + user_text(tok, reply_tokens, n + 1000))[:reply_tokens]
        more = [*messages, Message("user", user_text(tok, user_tokens, n)),
                Message("assistant", tok.decode(reply), token_ids=reply)]
        if len(chat._prompt(more, generation_prompt=False).ids) > tokens:
            break
        messages = more
    if not messages:
        return 0
    ids = chat._prompt(messages, generation_prompt=False).ids
    cfg = model.config.text
    dtype = getattr(mx, float_dtype(model))
    cache = model.make_cache(getattr(chat, "kv_bits", None))
    for c in cache:
        for start in range(0, len(ids), 1024):  # in pieces: a sliding layer keeps window + piece
            shape = (1, cfg.num_key_value_heads, min(1024, len(ids) - start), cfg.head_dim)
            c.update_and_fetch(mx.random.normal(shape).astype(dtype),
                               mx.random.normal(shape).astype(dtype))
            mx.eval([a for _, a in tree_flatten([c.keys, c.values])])
    compiled_decode(model.net.decoder, cache)  # the layout a reply leaves (ring, reserve)
    mx.eval([a for c in cache for _, a in tree_flatten([c.keys, c.values])])
    chat.messages = messages
    chat.session.cache, chat.session.ids, chat.session.pictures = cache, ids, []
    return len(messages) // 2


def grow(model: Model, context: int, user_tokens: int, reply_tokens: int,
         first_user_tokens: int | None = None, clear_cache: bool = False,
         chat_options: dict | None = None,
         after_turn: Callable[[Chat, list[int], Turn], None] | None = None,
         start_context: int = 0) -> Iterator[Turn]:
    """Send turns (user messages of `user_tokens`, the first of `first_user_tokens`, replies of
    at most `reply_tokens`, greedy) until the conversation holds about `context` tokens; yield
    each turn's figures. `after_turn(chat, prompt_ids, turn)` runs after each turn's figures
    are taken (e.g. to time a fresh prefill of the same prompt). `start_context` fast-forwards
    the conversation to about that many tokens first (see `fast_forward`)."""
    chat = Chat(model, temp=0.0, max_tokens=reply_tokens, **(chat_options or {}))
    weights = parameter_bytes(model.net)
    overhead = 8  # turn markers around a user message and a reply
    n = fast_forward(chat, start_context, user_tokens, reply_tokens) if start_context else 0

    def next_size(n: int) -> int:
        wanted = first_user_tokens if n == 0 and first_user_tokens else user_tokens
        size = min(wanted, context - chat.tokens_used - reply_tokens - overhead)
        return size if size >= min(16, wanted) else 0

    while size := next_size(n):
        text = user_text(model.tokenizer, size, n)
        prompt = chat.prompt_tokens(text)
        if clear_cache:
            mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        first_at, first_peak, last = None, 0, None
        for chunk in chat.stream(text):
            if first_at is None:
                first_at, first_peak = time.perf_counter(), mx.get_peak_memory()
            last = chunk
        end = time.perf_counter()
        peak = mx.get_peak_memory()
        held, kv_used = cache_bytes(chat.session.cache)  # the Chat's own KV cache
        stats = last.stats
        turn = Turn(
            turn=n, context_tokens=chat.session.cache[0].offset, prompt_tokens=len(prompt),
            prefilled_tokens=chat.session.prefilled_tokens, generated_tokens=stats.generated_tokens,
            finish_reason=last.finish_reason, ttft_s=first_at - start,
            engine_ttft_s=stats.time_to_first_token, turn_s=end - start,
            decode_tps=stats.decode_tps, peak_to_first_token_bytes=first_peak,
            peak_memory_bytes=peak, active_memory_bytes=mx.get_active_memory(),
            cache_memory_bytes=mx.get_cache_memory(), weights_bytes=weights,
            kv_cache_bytes=held, kv_used_bytes=kv_used, peak_ratio=peak / (weights + held),
            last=not next_size(n + 1))
        yield turn
        if after_turn is not None:
            after_turn(chat, prompt, turn)
        n += 1


def add_common_arguments(p: Any, context: int, user_tokens: int, reply_tokens: int) -> None:
    p.add_argument("--shape", choices=tuple(SHAPES), default="4b",
                   help="random real-shape model (4-bit g64 weights); default 4b")
    p.add_argument("--context", type=int, default=context,
                   help=f"grow the conversation to about this many tokens ({context})")
    p.add_argument("--user-tokens", type=int, default=user_tokens,
                   help=f"tokens per user message ({user_tokens})")
    p.add_argument("--first-user-tokens", type=int, default=None,
                   help="tokens of the first message (default: --user-tokens), e.g. a long paste")
    p.add_argument("--reply-tokens", type=int, default=reply_tokens,
                   help=f"tokens per reply at most ({reply_tokens})")
    p.add_argument("--tokenizer", default="words",
                   help="'words' (synthetic, one token per word: runs anywhere), a model alias "
                        "such as 270m, or a folder with a Gemma 3 tokenizer.json")
    p.add_argument("--fast-forward", type=int, default=0, metavar="TOKENS",
                   help="start from a past conversation of about this many tokens whose KV "
                        "cache is random, not prefilled (for slow machines: later turns cost "
                        "the same; 0: grow from the first message, the default)")
    p.add_argument("--json", default=None, help="write the report here")


def header(model: Model, args: Any, benchmark: str) -> dict:
    import mlx_lm

    env = {k: os.environ.get(k) for k in ("MLX_MAX_OPS_PER_BUFFER", "MLX_MAX_MB_PER_BUFFER")}
    return {"benchmark": benchmark, "env": env,
            "idle_active_memory_bytes": mx.get_active_memory(),
            "model": model.description, "shape": args.shape,
            "device": str(mx.default_device()), "dtype": float_dtype(model),
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "tokenizer": args.tokenizer,
            "context": args.context, "fast_forward": args.fast_forward,
            "user_tokens": args.user_tokens,
            "first_user_tokens": args.first_user_tokens, "reply_tokens": args.reply_tokens}


def float_dtype(model: Model) -> str:
    for _, v in tree_flatten(model.net.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return str(v.dtype).removeprefix("mlx.core.")
    return "?"


def format_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))
                     for r in [head, *rows])

