"""Bounding the KV cache, as a user asks for it: `kv_bits` / `--kv-bits 8|4` stores the global
layers' keys and values quantized; `max_context` / `--max-context` bounds the tokens the model
sees. Both in the library (generate, stream, Chat), the one-shot CLI and the chat command."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache
from test_chat import GREEDY, fed, record_prefills, talk, tiny_model  # noqa: F401
from test_cli import main_error, run

import gemma_mlx
from gemma_mlx import BadRequest, Chat, ContextOverflow, cli
from gemma_mlx.chat import prompt_ids
from gemma_mlx.engine import SamplingSettings, stream_tokens

PROMPT = "The history of the Roman Empire spans many centuries. In summary,"


@pytest.fixture(scope="module")
def tiny(model_270m):
    return tiny_model(model_270m.tokenizer, "tiny", sliding_window=512)


def global_cache_bytes(model, cache) -> int:
    return sum(c.nbytes for i, c in enumerate(cache) if not model.config.text.is_sliding(i))


def test_only_the_growing_global_layers_are_quantized(tiny):
    cache = tiny.make_cache(kv_bits=8)
    sliding = [tiny.config.text.is_sliding(i) for i in range(len(cache))]
    assert all(isinstance(c, RotatingKVCache) for c, s in zip(cache, sliding, strict=True) if s)
    assert all(isinstance(c, QuantizedKVCache) and c.bits == 8
               for c, s in zip(cache, sliding, strict=True) if not s)


@pytest.mark.parametrize("bits, tolerance", [(8, 0.02), (4, 0.15)])
def test_quantized_cache_logits_stay_close_to_full_precision(tiny, bits, tolerance):
    """Chunked prefill (through the dequantized keys) and one-token decode steps (through
    quantized matmuls) both see the quantized cache; the logits move by a few percent of
    their scale at 4 bits, much less at 8."""
    ids = mx.random.randint(0, 1000, (1, 48))

    def logits(kv_bits):
        cache = tiny.make_cache(kv_bits)
        out = [tiny(ids[:, s:s + 16], cache=cache) for s in range(0, 48, 16)]
        out += [tiny(ids[:, t:t + 1], cache=cache) for t in range(3)]
        return mx.concatenate(out, axis=1)

    full = logits(None)
    scale = mx.abs(full).max().item()
    error = mx.abs(logits(bits) - full).max().item()
    assert 0 < error < tolerance * scale


def test_8_bit_cache_gives_the_same_greedy_reply_on_the_270m(model_270m):
    ids = prompt_ids(model_270m, PROMPT, raw=True)
    replies, memory = {}, {}
    for bits in (None, 8, 4):
        cache = model_270m.make_cache(bits)
        chunks = list(stream_tokens(model_270m, ids, SamplingSettings(temp=0, max_tokens=8),
                                    cache=cache))
        replies[bits], memory[bits] = chunks[-1].tokens, global_cache_bytes(model_270m, cache)
    assert replies[8] == replies[None]
    # The 270M computes in float32 here: 8 bits (plus a scale and bias per 64) is 0.28 of it,
    # 4 bits 0.16 (half that again against a bfloat16 cache on a GPU).
    assert memory[8] / memory[None] == pytest.approx(9 / 32, rel=0.01)
    assert memory[4] / memory[None] == pytest.approx(5 / 32, rel=0.01)


def test_library_one_shot_takes_kv_bits_and_max_context(model_270m):
    reply = gemma_mlx.generate(model_270m, PROMPT, raw=True, kv_bits=8, max_context=64,
                               temp=0, max_tokens=4)
    assert reply == gemma_mlx.generate(model_270m, PROMPT, raw=True, temp=0, max_tokens=4)
    with pytest.raises(ContextOverflow, match="context window holds 64"):
        gemma_mlx.generate(model_270m, PROMPT * 6, raw=True, max_context=64, max_tokens=4)
    with pytest.raises(BadRequest, match="KV cache bits must be 4 or 8"):
        gemma_mlx.generate(model_270m, PROMPT, raw=True, kv_bits=3, max_tokens=4)
    with pytest.raises(BadRequest, match="at least 64 tokens"):
        gemma_mlx.generate(model_270m, PROMPT, raw=True, max_context=10, max_tokens=4)


def test_chat_with_a_quantized_cache_reuses_it_across_turns(tiny, tmp_path):
    chat = Chat(tiny, system="Be brief.", kv_bits=4, **GREEDY)
    first = talk(chat, "Hello there")
    second = talk(chat, "And then?")
    assert first.prefilled == len(first.prompt)
    assert second.prefilled == len(second.prompt) - len(fed(first))  # only the new tokens
    assert all(isinstance(c, QuantizedKVCache) for i, c in enumerate(chat.session.cache)
               if not tiny.config.text.is_sliding(i))
    chat.undo()
    assert talk(chat, "And then?").tokens == second.tokens  # trimmed, not rebuilt wrong
    saved = chat.save(tmp_path / "chat.json")
    assert json.loads(saved.read_text())["kv_bits"] == 4
    assert Chat.load(saved, tiny).kv_bits == 4
    with pytest.raises(BadRequest, match="KV cache bits must be 4 or 8"):
        Chat(tiny, kv_bits=16)


def test_cli_one_shot_takes_kv_bits_and_max_context(model_270m, capsys):
    result = run("-m", "270m", PROMPT, "--raw", "--temp", "0", "--max-tokens", "3",
                 "--kv-bits", "8", "--max-context", "128")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "context window holds 64" in main_error(capsys, "-m", "270m", PROMPT * 6, "--raw",
                                                   "--max-context", "64")
    assert "at least 64" in main_error(capsys, "-m", "270m", PROMPT, "--max-context", "8")
    with pytest.raises(SystemExit) as bad_bits:
        cli.main(["-m", "270m", PROMPT, "--kv-bits", "3"])
    assert bad_bits.value.code == 2
    assert "--kv-bits: invalid choice: 3" in capsys.readouterr().err
