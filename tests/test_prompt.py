"""The prompt format: `render` against the official Jinja chat template, `encode` against the
processor's way of tokenizing (expand every image, then tokenize the whole text at once).

The reference side is transformers itself: `apply_chat_template` with our copy of Google's
template, then Gemma3Processor's expansion (`full_image_sequence`, pan-and-scan text as in
`processing_gemma3.py`) tokenized by the real Gemma tokenizer plus `<image_soft_token>`.
"""

from __future__ import annotations

import copy

import jinja2
import pytest

from gemma_mlx.errors import BadRequest
from gemma_mlx.prompt import CHAT_TEMPLATE, ImageTokens, encode, pan_and_scan_text, render

IMAGE = {"type": "image"}
BOI, EOI, SOFT = 255999, 256000, 262144
GEMMA_IMAGE = ImageTokens(BOI, EOI, SOFT, 256)
FOUR_NEWLINES = 110  # "\n\n\n\n" is one token in Gemma's vocabulary


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def user(content) -> dict:
    return {"role": "user", "content": content}


def model(content) -> dict:
    return {"role": "assistant", "content": content}


def system(content) -> dict:
    return {"role": "system", "content": content}


CASES = {
    "one user turn": [user("Hello!")],
    "whitespace trimmed": [user("  \n Hello there \t\n")],
    "inner whitespace kept": [user("line one\n\n  line two  \nend")],
    "system string": [system("Be brief."), user("Why is the sky blue?")],
    "system not trimmed": [system("  Be brief. \n"), user(" Hi ")],
    "system as list": [system([text("You are a pirate.")]), user("Hello")],
    "system only": [system("Nobody speaks.")],
    "multi-turn": [user("Hi"), model("Hello! How can I help?  "), user("Tell me a joke."),
                   model(" Why did the chicken... "), user("Go on.")],
    "multi-turn with system": [system("Be brief."), user("Hi"), model("Hello."), user("Bye")],
    "unicode": [user("Grüße 👋 — 你好 ✓")],
    "ends with model turn": [user("Hi"), model("Hello.")],
    "list content": [user([text(" first part "), text("second part ")])],
    "image first": [user([IMAGE, text("What is this?")])],
    "image last": [user([text("Describe: "), IMAGE])],
    "image between text": [user([text("Compare "), IMAGE, text(" with "), IMAGE, text("?")])],
    "two images in a row": [user([IMAGE, IMAGE, text("Which is bigger?")])],
    "system then image first": [system("Be brief."), user([IMAGE, text("What is this?")])],
    "system list then image": [system([text("Answer in French.")]), user([IMAGE, IMAGE])],
    "image only": [user([IMAGE])],
    "images in later turns": [user([IMAGE, text("A cat?")]), model("Yes, a cat."),
                              user([text("And this one?"), IMAGE])],
    "unknown item type ignored": [user([text("hi"), {"type": "video"}, text("there")])],
}
IMAGE_CASES = [name for name, messages in CASES.items() if "image" in str(messages)]


def template(hf_tokenizer, messages, add_generation_prompt: bool = True) -> str:
    return hf_tokenizer.apply_chat_template(
        copy.deepcopy(messages), chat_template=CHAT_TEMPLATE, tokenize=False,
        add_generation_prompt=add_generation_prompt)


def processor_text(rendered: str, crops: list[int] | None = None, per_image: int = 256) -> str:
    """Gemma3Processor's expansion of each `<start_of_image>` (with `num_crops` per image)."""
    full = "\n\n<start_of_image>" + "<image_soft_token>" * per_image + "<end_of_image>\n\n"
    pieces = rendered.split("<start_of_image>")
    crops = crops or [0] * (len(pieces) - 1)
    out = pieces[0]
    for n_crops, piece in zip(crops, pieces[1:], strict=True):
        if n_crops:
            out += (f"Here is the original image {full} and here are some crops to help you "
                    "see better " + " ".join([full] * n_crops))
        else:
            out += full
        out += piece
    return out


@pytest.fixture(scope="module")
def tokenizer(model_270m):
    return model_270m.tokenizer


@pytest.fixture(scope="module")
def hf(tokenizer):
    return tokenizer._tokenizer


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_render_equals_the_official_template(hf, name, generation_prompt):
    messages = CASES[name]
    assert render(messages, add_generation_prompt=generation_prompt) == template(
        hf, messages, generation_prompt)


def test_render_spells_out_the_format():
    """The template's output in words (REFERENCE.md), independently of the Jinja."""
    messages = [system("Be brief."), user([IMAGE, text(" What? ")]), model("A cat. "), user("Ok")]
    assert render(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\n<start_of_image>What?<end_of_turn>\n"
        "<start_of_turn>model\nA cat.<end_of_turn>\n"
        "<start_of_turn>user\nOk<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.parametrize("messages", [
    [user("a"), user("b")],
    [model("a")],
    [system("s"), model("a")],
    [user("a"), model("b"), model("c")],
    [system("s"), user("a"), model("b"), user("c"), user("d")],
], ids=["user-user", "model first", "system-model", "model-model", "late user-user"])
def test_roles_must_alternate(hf, messages):
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        template(hf, messages)
    with pytest.raises(BadRequest, match="must alternate user/assistant"):
        render(messages)


@pytest.mark.parametrize("name", [n for n in CASES if n not in IMAGE_CASES])
def test_encode_text_equals_tokenizing_the_template(tokenizer, hf, name):
    rendered = template(hf, CASES[name])
    expected = hf.encode(rendered, add_special_tokens=False)
    assert encode(tokenizer, rendered) == expected
    assert encode(tokenizer, rendered, GEMMA_IMAGE) == expected  # no image: the same
    assert expected[0] == 2 and expected.count(2) == 1  # one <bos>, from the text


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_encode_with_images_equals_tokenizing_the_expanded_text_at_once(
        tokenizer, hf, soft_tokenizer, name):
    rendered = template(hf, CASES[name])
    expected = soft_tokenizer.encode(processor_text(rendered), add_special_tokens=False)
    ids = encode(tokenizer, rendered, GEMMA_IMAGE)
    assert ids == expected
    n_images = rendered.count("<start_of_image>")
    assert ids.count(BOI) == ids.count(EOI) == n_images
    assert ids.count(SOFT) == 256 * n_images


def test_blank_lines_merge_with_a_system_prompt_and_between_images(
        tokenizer, hf, soft_tokenizer):
    """The system prompt's "\\n\\n" and the image's leading "\\n\\n" are one token, and so
    are the blank lines between two images in a row; tokenizing the pieces apart would not
    give that."""
    rendered = render([system("Be brief."), user([IMAGE, IMAGE, text("Same?")])])
    ids = encode(tokenizer, rendered, GEMMA_IMAGE)
    assert ids == soft_tokenizer.encode(processor_text(rendered), add_special_tokens=False)
    first_boi = ids.index(BOI)
    assert ids[first_boi - 1] == FOUR_NEWLINES
    assert ids[first_boi - 2] != 108  # not "\n\n" + "\n\n"
    first_eoi = ids.index(EOI)
    assert ids[first_eoi + 1:first_eoi + 3] == [FOUR_NEWLINES, BOI]
    naive = hf.encode("Be brief.\n\n", add_special_tokens=False) + hf.encode(
        "\n\n", add_special_tokens=False)
    assert naive[-2:] == [108, 108]  # what tokenizing apart would have given


@pytest.mark.parametrize("per_image", [256, 4])
def test_soft_tokens_per_image_come_from_the_config(tokenizer, hf, soft_tokenizer, per_image):
    rendered = render(CASES["images in later turns"])
    ids = encode(tokenizer, rendered, ImageTokens(BOI, EOI, SOFT, per_image))
    expected = soft_tokenizer.encode(processor_text(rendered, per_image=per_image),
                                     add_special_tokens=False)
    assert ids == expected


@pytest.mark.parametrize("crops", [[2], [4], [3, 0], [0, 2]], ids=str)
def test_pan_and_scan_text_equals_the_processor(tokenizer, soft_tokenizer, crops):
    """Our message content with pan-and-scan text in place of each cropped image gives the
    tokens of the processor's pan-and-scan expansion of the plain template output."""
    plain, ours = [], []
    for i, n_crops in enumerate(crops):
        plain += [IMAGE, text(f"image {i}")]
        ours += [text(pan_and_scan_text(n_crops)) if n_crops else IMAGE, text(f"image {i}")]
    reference = processor_text(render([system("Sys."), user(plain)]), crops)
    ids = encode(tokenizer, render([system("Sys."), user(ours)]), GEMMA_IMAGE)
    assert ids == soft_tokenizer.encode(reference, add_special_tokens=False)
    assert ids.count(BOI) == sum(1 + n for n in crops)


def test_images_for_a_text_only_model_are_refused(tokenizer):
    with pytest.raises(BadRequest, match="text only"):
        encode(tokenizer, render([user([IMAGE, text("hi")])]), None)
