"""Chat as a user drives it: turns, streaming, undo/retry/clear, KV-cache reuse, the context
window, images, bad input, interruption, save/load.

Two kinds of model: the real 270M (a base model, so its replies are gibberish in chat form:
only the mechanics are asserted, on a few short greedy turns) and tiny random Gemma 3s with the
270M's tokenizer, fast enough for many turns. Their embedding is drawn small and everything
else at unit scale, so that a reply depends on the whole context (with every weight small the
model only repeats the last prompt token, and images could not change anything). Their
sliding window is 16 tokens, so the rotating caches wrap in the first turn and cannot be
trimmed; the `trimming` variants have a 512-token window, so their caches can.

The central check of cache reuse: a turn prefills exactly the tokens that are not already in
the cache, and its (greedy) reply equals the one a fresh Chat with the same history gives
after prefilling everything.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from PIL import Image, ImageFile

import gemma_mlx
from gemma_mlx import BadImage, BadRequest, Chat, ContextOverflow, Message, engine
from gemma_mlx.chat import Attachment
from gemma_mlx.config import ModelConfig
from gemma_mlx.engine import cache_offset
from gemma_mlx.loading import Model
from gemma_mlx.model.gemma3 import Gemma3
from gemma_mlx.prompt import CHAT_TEMPLATE

BOS, BOI, SOFT = 2, 255999, 262144
GREEDY = dict(temp=0, max_tokens=4)

TEXT = dict(
    model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=262144,
    sliding_window=16, sliding_window_pattern=2, query_pre_attn_scalar=32,
    max_position_embeddings=512, rms_norm_eps=1e-6, torch_dtype="float32",
)
VISION = dict(
    image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=64,
)


def tiny_model(tokenizer, name: str, vision: bool = False, **text) -> Model:
    text_config = {**TEXT, **text}
    if vision:
        config = dict(model_type="gemma3", text_config={**text_config, "vocab_size": 262208},
                      vision_config=VISION, mm_tokens_per_image=4)
    else:
        config = text_config
    net = Gemma3(ModelConfig.from_dict(config))
    mx.random.seed(0)
    weights = [(k, mx.random.normal(v.shape) * (0.2 if "embed_tokens" in k else 1.0))
               for k, v in tree_flatten(net.parameters())]
    net.update(tree_unflatten(weights))
    mx.eval(net.parameters())
    return Model(net, tokenizer, Path(name), quantization=None, name=name)


@pytest.fixture(scope="module")
def tokenizer(model_270m):
    return model_270m.tokenizer


@pytest.fixture(scope="module")
def wrapping(tokenizer):
    return tiny_model(tokenizer, "tiny")


@pytest.fixture(scope="module")
def trimming(tokenizer):
    return tiny_model(tokenizer, "tiny-wide", sliding_window=512)


@pytest.fixture(scope="module")
def vision(tokenizer):
    return tiny_model(tokenizer, "tiny-vision", vision=True)


@pytest.fixture(scope="module")
def vision_trimming(tokenizer):
    return tiny_model(tokenizer, "tiny-vision-wide", vision=True, sliding_window=512)


PREFILLS: list[int] = []


@pytest.fixture(autouse=True)
def record_prefills(monkeypatch):
    """Every prompt the engine runs through the model: proof of what a turn prefilled."""
    real = engine.prefill

    def recording(model, ids, cache, *args, **kwargs):
        PREFILLS.append(len(ids))
        return real(model, ids, cache, *args, **kwargs)

    PREFILLS.clear()
    monkeypatch.setattr(engine, "prefill", recording)


@pytest.fixture
def encodes(monkeypatch, vision, vision_trimming):
    """The batch size of every call of the vision tower (on both tiny vision models)."""
    calls: list[int] = []
    for model in (vision, vision_trimming):
        real = model.net.encode_images

        def counting(pixels, real=real):
            calls.append(pixels.shape[0])
            return real(pixels)

        monkeypatch.setattr(model.net, "encode_images", counting)
    return calls


# ---- helpers ----------------------------------------------------------------------------------

@dataclass
class Turn:
    prompt: list[int]  # prompt_tokens() just before sending
    cached: list[int]  # the token ids in the KV cache before the turn
    text: str  # the streamed text
    tokens: list[int]  # the reply's tokens
    finish: str
    stop_token: int | None
    prefilled: int


def talk(chat: Chat, text: str, images=(), **kwargs) -> Turn:
    prompt = chat.prompt_tokens(text, images)
    cached = list(chat.session.ids)
    chunks = list(chat.stream(text, images, **kwargs))
    return finished(chat, prompt, cached, chunks)


def finished(chat: Chat, prompt: list[int], cached: list[int], chunks: list) -> Turn:
    last = chunks[-1]
    turn = Turn(prompt, cached, "".join(c.text for c in chunks), list(last.tokens),
                last.finish_reason, last.token, chat.session.prefilled_tokens)
    assert PREFILLS[-1] == turn.prefilled  # what the engine really ran
    reply = chat.messages[-1]
    assert (reply.role, reply.text, reply.token_ids, reply.stopped) == (
        "assistant", turn.text, turn.tokens, False)
    assert len(chat.session.ids) == cache_offset(chat.session.cache)  # the bookkeeping is true
    return turn


def fed(turn: Turn, max_tokens: int = GREEDY["max_tokens"]) -> list[int]:
    """The ids a turn left in the cache: the prompt and each reply token that the next decode
    step consumed. The last token of a reply cut by max_tokens never went in; a stop token
    did (unless it was the max_tokens-th); a reply stopped by should_stop went in whole."""
    if turn.finish == "length":
        return turn.prompt + turn.tokens[:-1]
    if turn.finish == "stop" and len(turn.tokens) + 1 < max_tokens:
        return turn.prompt + turn.tokens + [turn.stop_token]
    return turn.prompt + turn.tokens


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def copy_of(chat: Chat) -> Chat:
    """A fresh Chat (no cache, no vision features) with the same settings and history."""
    limit = chat.context_limit if chat.context_limit < chat.model.context_limit else None
    other = Chat(chat.model, system=chat.system, max_context=limit,
                 pan_and_scan=chat.pan_and_scan, **vars(chat.settings))
    other.messages = [replace(m) for m in chat.messages]
    other.first_turn = chat.first_turn
    return other


def fresh_reply(chat: Chat, text: str, images=()) -> list[int]:
    """The reply tokens a fresh Chat with this history gives, prefilling everything."""
    other = copy_of(chat)
    turn = talk(other, text, images)
    assert turn.prefilled == len(turn.prompt)
    return turn.tokens


def state(chat: Chat) -> tuple:
    """Everything a failed request must leave as it was."""
    messages = [(m.role, m.text, m.token_ids, m.stopped, [a.hash for a in m.images])
                for m in chat.messages]
    offset = cache_offset(chat.session.cache) if chat.session.cache is not None else None
    return (messages, list(chat.session.ids), offset, chat.first_turn, list(chat.notices),
            chat.tokens_used, chat.session.prefilled_tokens, len(chat.session.features))


def end_of_turn(tokenizer) -> list[int]:
    return tokenizer.encode("<end_of_turn>\n", add_special_tokens=False)


def solid(rgb, size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, rgb)


RED, BLUE, GREEN = solid((250, 20, 20)), solid((20, 20, 250)), solid((20, 200, 20))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def expanded_template(messages: list[Message], system: str | None, hf, per_image: int) -> str:
    """What transformers feeds the model: the official template over the messages, each
    `<start_of_image>` expanded as Gemma3Processor does."""
    dicts = [{"role": "system", "content": system}] if system else []
    for m in messages:
        content = [{"type": "image"} for _ in m.images] + [{"type": "text", "text": m.text}]
        dicts.append({"role": m.role, "content": content if m.images else m.text})
    rendered = hf.apply_chat_template(dicts, chat_template=CHAT_TEMPLATE, tokenize=False,
                                      add_generation_prompt=True)
    block = "\n\n<start_of_image>" + "<image_soft_token>" * per_image + "<end_of_image>\n\n"
    return rendered.replace("<start_of_image>", block)


# ---- the real 270M ----------------------------------------------------------------------------

def test_270m_conversation_reuses_the_cache_and_matches_a_fresh_chat(model_270m):
    """A few short greedy turns (prefill on this CPU is slow: each token counts)."""
    tokenizer = model_270m.tokenizer
    chat = gemma_mlx.Chat(model_270m, system="Be terse.", temp=0, max_tokens=3)
    assert chat.context_limit == model_270m.context_limit == 32768
    assert chat.tokens_used == 0 and chat.messages == []

    prompt = chat.prompt_tokens("Hi!")
    assert prompt == tokenizer.encode(
        "<bos><start_of_turn>user\nBe terse.\n\nHi!<end_of_turn>\n<start_of_turn>model\n",
        add_special_tokens=False)
    reply = chat.send("Hi!")
    assert isinstance(reply, str) and reply == chat.messages[-1].text
    assert [(m.role, m.stopped) for m in chat.messages] == [("user", False), ("assistant", False)]
    assert chat.messages[0].text == "Hi!"
    assert chat.session.prefilled_tokens == len(prompt) == PREFILLS[-1]
    first = chat.messages[-1].token_ids
    assert 0 < len(first) <= 3
    assert chat.tokens_used == len(prompt) + len(first) + len(end_of_turn(tokenizer))

    # A follow-up prefills only what the cache lacks, and answers as a fresh chat does.
    expected = fresh_reply(chat, "Why?")
    second = talk(chat, "Why?")
    assert second.prompt[:len(second.cached)] == second.cached
    assert second.prefilled == len(second.prompt) - len(second.cached) < len(prompt)
    assert second.tokens == expected
    assert chat.session.ids == fed(second, max_tokens=3)

    # Retry: the 270M's window (512) has not wrapped, so the cache is trimmed to the prompt.
    retried = finished(chat, second.prompt, list(chat.session.ids), list(chat.retry()))
    assert retried.prefilled == 1 and retried.tokens == second.tokens
    assert len(chat.messages) == 4 and chat.messages[-1].token_ids == second.tokens


def test_270m_prompt_tokens_equal_the_official_template(model_270m):
    chat = Chat(model_270m, system="Answer in one word.")
    chat.messages = [Message("user", " Hi there "), Message("assistant", "Hello! "),
                     Message("user", "What's 2+2?"), Message("assistant", "\nFour.")]
    hf = model_270m.tokenizer._tokenizer
    text = expanded_template([*chat.messages, Message("user", "And 3+3? ")], chat.system, hf, 0)
    assert chat.prompt_tokens("And 3+3? ") == hf.encode(text, add_special_tokens=False)


def test_270m_refuses_images(model_270m, tmp_path):
    path = tmp_path / "red.png"
    RED.save(path)
    chat = Chat(model_270m, **GREEDY)
    for call in (lambda: chat.send("What is this?", images=[path]),
                 lambda: chat.prompt_tokens("What is this?", images=[path])):
        with pytest.raises(BadImage, match="takes text only.*vision model"):
            call()
    assert chat.messages == [] and chat.session.ids == []


# ---- turns and the KV cache (tiny models) -----------------------------------------------------

@pytest.mark.parametrize("model_name", ["wrapping", "trimming"])
def test_each_turn_prefills_only_new_tokens_and_matches_a_fresh_chat(request, model_name):
    model = request.getfixturevalue(model_name)
    chat = Chat(model, system="Be brief.", **GREEDY)
    previous = None
    for i, text in enumerate(["Hello!", "What is the capital of France?", "Why?", "Thanks."]):
        expected = fresh_reply(chat, text)
        turn = talk(chat, text)
        assert turn.tokens == expected
        if previous is None:
            assert turn.prefilled == len(turn.prompt)
        else:
            assert turn.cached == fed(previous)
            assert turn.prompt[:len(turn.cached)] == turn.cached
            assert turn.prefilled == len(turn.prompt) - len(turn.cached)
        assert chat.session.ids == fed(turn)
        assert len(chat.messages) == 2 * (i + 1)
        previous = turn
    if model_name == "wrapping":  # the rotating caches wrapped long ago
        assert cache_offset(chat.session.cache) > 3 * model.config.text.sliding_window


@pytest.mark.parametrize("model_name", ["wrapping", "trimming"])
def test_undo_trims_the_cache_or_prefills_again(request, model_name):
    model = request.getfixturevalue(model_name)
    chat = Chat(model, system="Be brief.", **GREEDY)
    first = talk(chat, "Hello!")
    talk(chat, "Tell me a story.")
    assert chat.undo().text == "Tell me a story."
    assert len(chat.messages) == 2
    assert chat.tokens_used == len(first.prompt) + len(first.tokens) + len(
        end_of_turn(model.tokenizer))

    expected = fresh_reply(chat, "Tell me a joke.")
    turn = talk(chat, "Tell me a joke.")
    assert turn.tokens == expected
    if model_name == "trimming":  # kept the first exchange and the new turn's common start
        reused = common_prefix(turn.prompt, turn.cached)
        assert reused >= len(fed(first))
        assert turn.prefilled == len(turn.prompt) - reused
    else:  # a wrapped rotating cache cannot be trimmed: everything again
        assert turn.prefilled == len(turn.prompt)

    assert chat.undo().text == "Tell me a joke."
    assert chat.undo().text == "Hello!"
    assert chat.undo() is None
    assert chat.messages == [] and chat.tokens_used == 0
    expected = fresh_reply(chat, "Hi again.")
    assert talk(chat, "Hi again.").tokens == expected


@pytest.mark.parametrize("model_name", ["wrapping", "trimming"])
def test_retry_generates_the_last_reply_again(request, model_name):
    model = request.getfixturevalue(model_name)
    chat = Chat(model, **GREEDY)
    talk(chat, "Hello!")
    turn = talk(chat, "Name three fruits.")
    before = [m.text for m in chat.messages]
    chunks = list(chat.retry())
    retried = finished(chat, turn.prompt, list(chat.session.ids), chunks)
    assert retried.tokens == turn.tokens  # greedy: the same reply
    assert [m.text for m in chat.messages] == before
    assert retried.prefilled == (1 if model_name == "trimming" else len(turn.prompt))
    assert chat.session.ids == fed(retried)

    sampled = "".join(c.text for c in chat.retry(temp=1.0, top_k=0, top_p=1.0, seed=1,
                                                  max_tokens=6))
    assert chat.messages[-1].text == sampled and len(chat.messages) == 4
    assert len(chat.messages[-1].token_ids) == 6
    expected = fresh_reply(chat, "More.")
    assert talk(chat, "More.").tokens == expected


def test_retry_without_a_reply_is_refused(wrapping):
    chat = Chat(wrapping, **GREEDY)
    with pytest.raises(BadRequest, match="no reply to retry"):
        list(chat.retry())
    talk(chat, "Hello!")
    chat.undo()
    with pytest.raises(BadRequest, match="no reply to retry"):
        list(chat.retry())


def test_stream_yields_what_send_returns(wrapping):
    streamed = Chat(wrapping, system="Be brief.", **GREEDY)
    chunks = list(streamed.stream("Hello!"))
    assert all(isinstance(c, gemma_mlx.Chunk) for c in chunks)
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "length" and chunks[-1].stats.generated_tokens == 4
    text = "".join(c.text for c in chunks)
    sent = Chat(wrapping, system="Be brief.", **GREEDY)
    assert sent.send("Hello!") == text == streamed.messages[-1].text
    assert streamed.messages[-1].token_ids == sent.messages[-1].token_ids
    # Per-message overrides of the sampling settings.
    assert len(talk(sent, "More!", max_tokens=2).tokens) == 2
    assert sent.settings.max_tokens == 4


def test_clear_starts_over(wrapping):
    chat = Chat(wrapping, system="Be brief.", **GREEDY)
    talk(chat, "Hello!")
    talk(chat, "Again.")
    chat.clear()
    assert chat.messages == [] and chat.tokens_used == 0 and chat.session.ids == []
    turn = talk(chat, "Hello!")
    assert turn.prefilled == len(turn.prompt)
    assert turn.text == Chat(wrapping, system="Be brief.", **GREEDY).send("Hello!")


@pytest.mark.parametrize("call,message", [
    (lambda chat: chat.send("   \n"), "the message is empty"),
    (lambda chat: chat.send("Hi", max_tokens=0), "max tokens must be at least 1"),
    (lambda chat: chat.send("Hi", temp=-1), "temperature must be 0"),
    (lambda chat: chat.send("Hi", top_p=2), "top-p must be between 0 and 1"),
], ids=["empty", "max_tokens", "temp", "top_p"])
def test_bad_requests_change_nothing(wrapping, call, message):
    chat = Chat(wrapping, **GREEDY)
    talk(chat, "Hello!")
    before = state(chat)
    with pytest.raises(BadRequest, match=message):
        call(chat)
    assert state(chat) == before


def test_bad_chat_options_are_refused(wrapping):
    with pytest.raises(BadRequest, match="at least 64 tokens"):
        Chat(wrapping, max_context=10)
    with pytest.raises(BadRequest, match="top-k"):
        Chat(wrapping, top_k=-1)


# ---- interruption -----------------------------------------------------------------------------

class Interrupt:
    """Stops a stream after `after` chunks: should_stop returning True, a KeyboardInterrupt
    raised from inside should_stop (Ctrl-C), or the caller closing the stream."""

    def __init__(self, how: str, after: int = 2):
        self.how, self.after, self.chunks = how, after, []

    def should_stop(self) -> bool:
        if len(self.chunks) >= self.after:
            if self.how == "keyboard":
                raise KeyboardInterrupt
            return self.how == "should_stop"
        return False

    def run(self, chat: Chat, text: str, keep_partial: bool) -> None:
        stream = chat.stream(text, should_stop=self.should_stop, keep_partial=keep_partial)
        if self.how == "close":
            self.chunks += [next(stream) for _ in range(self.after)]
            stream.close()
        elif self.how == "keyboard":
            with pytest.raises(KeyboardInterrupt):
                for chunk in stream:
                    self.chunks.append(chunk)
        else:
            for chunk in stream:
                self.chunks.append(chunk)
            assert self.chunks[-1].finish_reason == "cancelled"
            assert self.chunks[-1].tokens == [c.token for c in self.chunks[:-1]]


@pytest.mark.parametrize("keep_partial", [True, False], ids=["keep", "drop"])
@pytest.mark.parametrize("how", ["should_stop", "keyboard", "close"])
def test_an_interrupted_reply_is_kept_marked_stopped_or_dropped(wrapping, how, keep_partial):
    chat = Chat(wrapping, system="Be brief.", max_tokens=8, temp=0)
    talk(chat, "Hello!")
    before = state(chat)
    prompt = chat.prompt_tokens("Tell me a long story.")
    interrupt = Interrupt(how)
    interrupt.run(chat, "Tell me a long story.", keep_partial)
    partial = [c.token for c in interrupt.chunks[:2]]
    assert len(partial) == 2 and None not in partial

    if keep_partial:
        assert len(chat.messages) == 4
        reply = chat.messages[-1]
        assert reply.role == "assistant" and reply.stopped
        assert reply.token_ids == partial
        assert reply.text == wrapping.tokenizer.decode(partial)
        assert chat.messages[-2].text == "Tell me a long story."
    else:
        assert state(chat)[0] == before[0]  # the messages are as before the turn
        assert chat.first_turn == before[3]
    if how == "keyboard":  # a step may have been cut half-way: the cache is rebuilt
        assert chat.session.cache is None and chat.session.ids == []
    else:
        assert chat.session.ids == prompt + partial

    expected = fresh_reply(chat, "Go on.")
    turn = talk(chat, "Go on.")
    assert turn.tokens == expected
    assert not chat.messages[-1].stopped
    if keep_partial and how != "keyboard":  # the partial reply is in the cache already
        assert turn.prompt[:len(turn.cached)] == turn.cached
        assert turn.prefilled == len(turn.prompt) - len(turn.cached)
    else:  # no cache, or one holding the dropped reply that a wrapped cache cannot trim
        assert turn.prefilled == len(turn.prompt)


def test_a_stop_during_prefill_ends_the_reply_before_its_first_token(trimming, monkeypatch):
    """should_stop is read before each prefill chunk: a long prompt can be stopped before any
    token, and the cache keeps the chunks read, so the next turn goes on from them."""
    monkeypatch.setattr(engine, "PREFILL_CHUNK", 8)
    chat = Chat(trimming, max_tokens=4, temp=0)
    asked = []

    def stop_at_third_chunk() -> bool:
        asked.append(1)
        return len(asked) >= 3

    chunks = list(chat.stream("Tell me a long story about foxes and crows and rivers.",
                              should_stop=stop_at_third_chunk))
    assert [c.finish_reason for c in chunks] == ["cancelled"] and chunks[0].tokens == []
    assert len(chat.session.ids) == cache_offset(chat.session.cache) == 16  # two chunks
    expected = fresh_reply(chat, "Go on.")
    turn = talk(chat, "Go on.")
    assert turn.tokens == expected


# ---- the context window -----------------------------------------------------------------------

@pytest.mark.parametrize("model_name", ["wrapping", "trimming"])
def test_oldest_turns_are_dropped_to_fit_max_context(request, model_name, tokenizer):
    model = request.getfixturevalue(model_name)
    chat = Chat(model, system="Be brief.", max_context=64, **GREEDY)
    assert chat.context_limit == 64
    start = tokenizer.encode("<bos><start_of_turn>user\nBe brief.\n\n", add_special_tokens=False)
    texts = [f"Tell me something about the number {n}, please." for n in range(6)]
    for text in texts:
        dropped_before = chat.first_turn
        expected = fresh_reply(chat, text)
        turn = talk(chat, text)
        assert turn.tokens == expected
        assert chat.tokens_used + 1 <= 64  # with room for the next reply token
        if chat.first_turn > dropped_before:
            assert chat.notices[-1] == (
                "the conversation outgrew the context window (64 tokens): dropped the oldest "
                f"{chat.first_turn - dropped_before} message(s)")
            reused = common_prefix(turn.prompt, turn.cached)
            assert reused >= len(start)  # the system prompt stays in front
            if model_name == "trimming":
                assert turn.prefilled == len(turn.prompt) - reused
            else:
                assert turn.prefilled == len(turn.prompt)
    assert chat.first_turn >= 4 and chat.first_turn % 2 == 0
    assert len(chat.notices) >= 2
    assert len(chat.messages) == 2 * len(texts)  # the transcript keeps everything
    assert chat.visible_messages() == chat.messages[chat.first_turn:]
    assert chat.visible_messages()[0].role == "user"
    ids = chat.prompt_tokens("Last one.")
    assert ids[:len(start)] == start
    shown = tokenizer.decode(ids)
    assert texts[0] not in shown and texts[-1] in shown


def test_the_models_own_window_is_the_default_limit(tokenizer):
    model = tiny_model(tokenizer, "tiny-96", max_position_embeddings=96)
    chat = Chat(model, **GREEDY)
    assert chat.context_limit == 96
    for n in range(6):
        talk(chat, f"Here is message number {n} of a long conversation.")
    assert chat.first_turn > 0
    assert "context window (96 tokens)" in chat.notices[-1]
    assert chat.tokens_used < 96


@pytest.mark.parametrize("max_context", [None, 64])
def test_a_message_that_cannot_fit_is_refused(wrapping, max_context):
    chat = Chat(wrapping, system="Be brief.", max_context=max_context, **GREEDY)
    talk(chat, "Hello!")
    talk(chat, "Again.")
    before = state(chat)
    huge = "word " * (chat.context_limit + 10)
    for call in (lambda: chat.send(huge), lambda: chat.prompt_tokens(huge)):
        with pytest.raises(ContextOverflow, match=r"this message needs \d+ tokens but the "
                           rf"context window holds {chat.context_limit} .*shorten it"):
            call()
        assert state(chat) == before
    expected = fresh_reply(chat, "Short.")
    assert talk(chat, "Short.").tokens == expected


# ---- images -----------------------------------------------------------------------------------

def test_prompt_tokens_with_images_equal_the_template_and_processor(vision, soft_tokenizer):
    chat = Chat(vision, system="Be brief.")
    red, blue = Attachment.load(RED), Attachment.load(BLUE)
    chat.messages = [Message("user", "What is this?", [red]), Message("assistant", "A flag."),
                     Message("user", "And these two?", [blue, red]), Message("assistant", "Ok")]
    ids = chat.prompt_tokens(" Compare them. ", images=[BLUE])
    history = [*chat.messages, Message("user", " Compare them. ", [Attachment.load(BLUE)])]
    text = expanded_template(history, chat.system, soft_tokenizer, per_image=4)
    assert ids == soft_tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(BOI) == 4 and ids.count(SOFT) == 16


def test_an_image_changes_the_reply(vision, tmp_path):
    path = tmp_path / "red.png"
    RED.save(path)
    replies = []
    for images in ([], [path], [BLUE]):
        chat = Chat(vision, **GREEDY)
        chat.send("What is this?", images=images)
        replies.append(tuple(chat.messages[-1].token_ids))
    assert len(set(replies)) == 3  # the picture matters, and which one
    assert chat.messages[0].images[0].hash == Attachment.load(BLUE).hash


def test_the_same_picture_is_encoded_once(vision, encodes, tmp_path):
    path = tmp_path / "red.png"
    RED.save(path)
    chat = Chat(vision, system="Be brief.", **GREEDY)
    talk(chat, "What is this?", images=[path])
    assert encodes == [1]
    assert chat.messages[0].images[0].source == str(path.resolve())

    # The same picture again, given another way (PIL image, PNG bytes): not encoded again.
    second = talk(chat, "And now?", images=[RED])
    assert second.prefilled == len(second.prompt) - len(second.cached)
    third = talk(chat, "Once more.", images=[png_bytes(RED)])
    list(chat.retry())  # the wrapped cache is prefilled again, with all three images
    assert chat.session.prefilled_tokens == len(third.prompt)
    assert encodes == [1]

    expected = fresh_reply(chat, "And these?", [GREEN, RED, GREEN])
    assert encodes[1:] == [2]  # a fresh chat encodes its two distinct pictures, once each
    del encodes[:]
    turn = talk(chat, "And these?", images=[GREEN, RED, GREEN])
    assert encodes == [1]  # only the new picture
    assert turn.prompt.count(BOI) == 6
    assert turn.tokens == expected


def test_a_different_picture_after_undo_is_not_mistaken_for_the_cached_one(
        vision_trimming, encodes):
    """Every image block has the same token ids, so the cache reuse must compare pictures
    too: after undo, the same words with another picture must not reuse the old one."""
    chat = Chat(vision_trimming, system="Be brief.", **GREEDY)
    red = talk(chat, "What is this?", images=[RED])
    chat.undo()
    expected = fresh_reply(chat, "What is this?", [BLUE])
    blue = talk(chat, "What is this?", images=[BLUE])
    assert blue.tokens == expected != red.tokens
    assert blue.prefilled == len(blue.prompt) - blue.prompt.index(BOI)  # from the image on
    # The same picture after undo reuses the cache up to the end of the prompt.
    chat.undo()
    again = talk(chat, "What is this?", images=[BLUE])
    assert again.prefilled == 1 and again.tokens == blue.tokens


def test_more_pictures_than_the_feature_cache_holds(vision, encodes, monkeypatch):
    monkeypatch.setattr(gemma_mlx.session, "FEATURE_CACHE_SIZE", 2)
    chat = Chat(vision, **GREEDY)
    pictures = [RED, BLUE, GREEN]
    expected = fresh_reply(chat, "Three pictures.", pictures)
    assert talk(chat, "Three pictures.", images=pictures).tokens == expected
    assert len(chat.session.features) == 2


def test_pan_and_scan_adds_the_crops(vision, encodes):
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 600, 3), np.uint8))
    plain = Chat(vision, **GREEDY)
    assert plain.prompt_tokens("What is this?", images=[wide]).count(BOI) == 1
    chat = Chat(vision, pan_and_scan=True, **GREEDY)
    ids = chat.prompt_tokens("What is this?", images=[wide])
    assert ids.count(BOI) == 3 and ids.count(SOFT) == 12  # the picture and its two crops
    assert "Here is the original image" in vision.tokenizer.decode(ids)
    turn = talk(chat, "What is this?", images=[wide])
    assert encodes == [3]
    assert turn.prompt == ids
    expected = fresh_reply(chat, "And now?", [wide])
    assert talk(chat, "And now?", images=[wide]).tokens == expected


def test_images_leave_with_their_turn(vision, encodes):
    chat = Chat(vision, system="Be brief.", max_context=64, **GREEDY)
    pictures = [RED, BLUE, GREEN, solid((200, 200, 0))]
    for n, picture in enumerate(pictures):
        expected = fresh_reply(chat, f"Picture {n}?", [picture])
        turn = talk(chat, f"Picture {n}?", images=[picture])
        assert turn.tokens == expected
        visible = chat.visible_messages()
        assert turn.prompt.count(BOI) == sum(len(m.images) for m in visible)
    assert chat.first_turn >= 2
    assert "dropped the oldest" in chat.notices[-1]
    assert chat.messages[0].images  # the transcript keeps them; the model no longer sees them


# ---- bad input --------------------------------------------------------------------------------

def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height: a decompression bomb's header."""
    data = bytearray(png_bytes(Image.new("RGB", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def bad_source(kind: str, folder: Path):
    """(image source, what the BadImage message must say) for each kind of bad input."""
    if kind == "missing":
        return folder / "nope.png", ["nope.png", "no such file", "check the path"]
    if kind == "folder":
        return folder, [str(folder), "not a file"]
    if kind == "not an image":
        path = folder / "notes.png"
        path.write_text("just some text, not a picture\n")
        return path, ["notes.png", "not an image", "convert it to PNG or JPEG"]
    if kind == "unsupported bytes":
        return b"\x00\x01garbage" * 10, ["the image bytes", "not an image"]
    if kind == "corrupt":
        data = png_bytes(Image.fromarray(
            np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)))
        path = folder / "broken.png"
        path.write_bytes(data[:len(data) // 2])
        return path, ["broken.png", "corrupt or truncated", "re-save or re-download"]
    if kind in ("bomb", "huge bomb"):
        size = 8000 if kind == "bomb" else 30000
        path = folder / "bomb.png"
        path.write_bytes(png_claiming_size(size, size))
        return path, ["bomb.png", "too large", f"{size * size / 1e6:.0f} megapixels",
                      "refused before decoding", "downscale it"]
    if kind == "unreachable url":
        url = "http://127.0.0.1:9/x.png"
        return url, [url, "unreachable", "check the address"]
    raise AssertionError(kind)


BAD_KINDS = ["missing", "folder", "not an image", "unsupported bytes", "corrupt", "bomb",
             "huge bomb", "unreachable url"]


@pytest.fixture
def no_decoding(monkeypatch):
    def refuse(self):
        raise AssertionError("decoded the pixels of an image that should have been refused")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_bad_image_is_refused_and_nothing_changes(vision, encodes, tmp_path, kind, request):
    if "bomb" in kind:
        request.getfixturevalue("no_decoding")
    chat = Chat(vision, system="Be brief.", **GREEDY)
    talk(chat, "What is this?", images=[RED])
    before = state(chat)
    source, parts = bad_source(kind, tmp_path)
    for call in (lambda: chat.send("And this?", images=[source]),
                 lambda: list(chat.stream("And this?", images=[RED, source])),
                 lambda: chat.prompt_tokens("And this?", images=[source])):
        with pytest.raises(BadImage) as error:
            call()
        message = str(error.value)
        assert "\n" not in message
        for part in parts:
            assert part in message, message
        assert state(chat) == before
    assert encodes == [1]  # nothing was encoded for the refused message
    expected = fresh_reply(chat, "And this?", [BLUE])
    assert talk(chat, "And this?", images=[BLUE]).tokens == expected


def test_an_image_for_a_text_only_model_is_refused(wrapping, tmp_path):
    path = tmp_path / "red.png"
    RED.save(path)
    chat = Chat(wrapping, **GREEDY)
    talk(chat, "Hello!")
    before = state(chat)
    for source in (path, RED, png_bytes(RED)):
        with pytest.raises(BadImage, match="tiny takes text only: use a vision model"):
            chat.send("What is this?", images=[source])
        assert state(chat) == before
    expected = fresh_reply(chat, "Never mind.")
    assert talk(chat, "Never mind.").tokens == expected


# ---- save and load ----------------------------------------------------------------------------

def saved_json(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_same_conversation(a: Chat, b: Chat) -> None:
    assert state(a)[0] == state(b)[0]
    assert (a.system, vars(a.settings), a.first_turn, a.pan_and_scan, a.context_limit) == (
        b.system, vars(b.settings), b.first_turn, b.pan_and_scan, b.context_limit)
    assert a.prompt_tokens("Next?", images=[GREEN]) == b.prompt_tokens("Next?", images=[GREEN])


def conversation_with_images(model: Model, folder: Path, **options) -> tuple[Chat, Path]:
    path = folder / "photo.png"
    RED.save(path)
    chat = Chat(model, system="Be brief.", **GREEDY, **options)
    talk(chat, "What is this?", images=[path])
    talk(chat, "And this one?", images=[png_bytes(BLUE)])  # bytes: no source to refer to
    Interrupt("should_stop").run(chat, "Go on.", keep_partial=True)
    assert chat.messages[-1].stopped
    return chat, path


def test_save_and_load_with_embedded_images(vision, tmp_path):
    chat, photo = conversation_with_images(vision, tmp_path)
    saved = chat.save(tmp_path / "chat.json")
    data = saved_json(saved)
    images = [image for m in data["messages"] for image in m.get("images", [])]
    assert len(images) == 2 and all("png" in image and "sha256" in image for image in images)
    assert data["messages"][-1]["stopped"] is True
    photo.unlink()  # embedded: the chat no longer needs the file

    loaded = Chat.load(saved, vision)
    assert_same_conversation(chat, loaded)
    assert loaded.messages[-1].stopped
    expected = talk(chat, "Next?", images=[GREEN]).tokens
    assert talk(loaded, "Next?", images=[GREEN]).tokens == expected


def test_save_and_load_with_referenced_images(vision, tmp_path):
    chat, photo = conversation_with_images(vision, tmp_path, max_context=256, pan_and_scan=True)
    saved = chat.save(tmp_path / "chat.json", embed_images=False)
    first, second = (m["images"][0] for m in saved_json(saved)["messages"] if "images" in m)
    assert "png" not in first and first["source"] == str(photo.resolve())
    assert first["sha256"] == Attachment.load(RED).hash
    assert "png" in second  # bytes have nothing to refer to: embedded anyway

    loaded = Chat.load(saved, vision)
    assert_same_conversation(chat, loaded)

    solid((1, 2, 3)).save(photo)  # the picture changed on disk
    with pytest.raises(BadImage, match="photo.png changed since the chat was saved .*content "
                       "hash differs.*restore it, or save chats with embedded images"):
        Chat.load(saved, vision)
    photo.unlink()
    with pytest.raises(BadImage, match="photo.png: no such file"):
        Chat.load(saved, vision)


def test_a_relative_image_path_is_found_again(vision, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    RED.save("photo.png")
    (tmp_path / "chats").mkdir()
    chat = Chat(vision, **GREEDY)
    talk(chat, "What is this?", images=["photo.png"])
    chat.save("chats/chat.json", embed_images=False)
    monkeypatch.chdir(tmp_path / "chats")
    assert_same_conversation(chat, Chat.load("chat.json", vision))


def test_loading_a_chat_with_images_needs_a_vision_model(vision, wrapping, tmp_path):
    chat, _ = conversation_with_images(vision, tmp_path)
    saved = chat.save(tmp_path / "chat.json")
    with pytest.raises(BadImage, match="has images but tiny takes text only"):
        Chat.load(saved, wrapping)


def test_load_overrides_saved_settings(wrapping, tmp_path):
    chat = Chat(wrapping, system="Be brief.", **GREEDY)
    talk(chat, "Hello!")
    loaded = Chat.load(chat.save(tmp_path / "chat.json"), wrapping, max_tokens=2)
    assert loaded.settings.max_tokens == 2 and loaded.settings.temp == 0
    assert len(talk(loaded, "More.").tokens) == 2


@pytest.mark.parametrize("content", [
    '{"foo": 1}', "[1, 2]", '"hello"', "3", "null", "{not json", '{"messages": "x"}',
    '{"messages": [{"role": "user"}]}', '{"messages": [1]}', b"\xff\xfe\x00garbage",
], ids=["other dict", "list", "string", "number", "null", "not json", "messages string",
        "message without text", "message not a dict", "binary"])
def test_loading_something_else_is_a_clear_error(wrapping, tmp_path, content):
    path = tmp_path / "config.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(BadRequest, match="config.json is not a saved gemma-mlx chat"):
        Chat.load(path, wrapping)


def test_loading_a_missing_file(wrapping, tmp_path):
    with pytest.raises(BadRequest, match="no saved chat at .*nope.json: check the path"):
        Chat.load(tmp_path / "nope.json", wrapping)


def test_a_second_turn_while_one_streams_is_refused(model_270m):
    chat = Chat(model_270m, temp=0, max_tokens=3)
    first = chat.stream("Hello")
    next(first)
    with pytest.raises(BadRequest, match="still streaming"):
        chat.send("Again")
    first.close()  # closing ends the turn: the partial reply is kept, and turns work again
    assert chat.messages[-1].role == "assistant" and chat.messages[-1].stopped
    chat.send("Again")
    assert [m.role for m in chat.messages] == ["user", "assistant"] * 2


def test_reserved_image_token_in_text_is_refused(model_270m):
    chat = Chat(model_270m, temp=0, max_tokens=3)
    with pytest.raises(BadRequest, match="reserved token"):
        chat.send("look: <start_of_image>")
    assert chat.messages == []
