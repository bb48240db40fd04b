"""Image loading, preprocessing and pan-and-scan against transformers' PIL Gemma 3 processor.

`Gemma3ImageProcessorPil` runs without torch, so the reference here is the real thing, set up
with the values of Google's preprocessor_config.json. Our preprocess does the same operations
in the same dtypes, so the pixel values are compared for exact equality.
"""

from __future__ import annotations

import http.server
import io
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import transformers.models.gemma3.image_processing_pil_gemma3 as pil_processor
from PIL import Image, ImageDraw, ImageFile
from transformers.image_utils import load_image as hf_load_image

from gemma_mlx.errors import BadImage
from gemma_mlx.images import (
    MAX_IMAGE_PIXELS,
    crop_boxes,
    image_hash,
    load_image,
    pan_and_scan,
    preprocess,
)

SIZE = 96  # any size exercises the same code; 896 only makes the test slower
PAS = dict(pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4,
           pan_and_scan_min_ratio_to_activate=1.2)


def reference(size: int = SIZE, **kw):
    """Google's preprocessor_config.json values (size overridden for speed)."""
    return pil_processor.Gemma3ImageProcessorPil(
        size={"height": size, "width": size}, resample=2, rescale_factor=0.00392156862745098,
        image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True, **kw)


def reference_pixels(image: Image.Image, **kw) -> np.ndarray:
    return reference(**kw)(image, return_tensors="np")["pixel_values"]


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(data.squeeze(-1) if channels == 1 else data, mode)


def sample_images() -> dict[str, Image.Image]:
    palette = noise(50, 30).quantize(16)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 3
    drawing = Image.new("RGB", (300, 200), "skyblue")
    ImageDraw.Draw(drawing).ellipse((40, 30, 200, 170), fill="orange", outline="black")
    return {
        "non-square": noise(123, 77),
        "tall": noise(31, 140),
        "rgba": noise(64, 48, "RGBA"),
        "greyscale": noise(40, 60, "L"),
        "greyscale+alpha": noise(40, 60, "LA"),
        "palette": palette,
        "palette+transparency": palette_transparent,
        "drawing": drawing,
        "exact size": noise(SIZE, SIZE),
    }


@pytest.mark.parametrize("name", list(sample_images()))
def test_preprocess_equals_reference(name):
    image = sample_images()[name]
    ours = preprocess(image, SIZE)
    assert ours.shape == (3, SIZE, SIZE) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, reference_pixels(image)[0])


def test_preprocess_real_size():
    image = sample_images()["drawing"]
    np.testing.assert_array_equal(preprocess(image), reference_pixels(image, size=896)[0])


@pytest.mark.parametrize("name", ["rgba", "palette+transparency", "greyscale+alpha"])
def test_load_image_composites_transparency_on_white(tmp_path, name):
    image = sample_images()[name]
    path = tmp_path / "image.png"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    # What the processor itself does with the file's image (convert_to_rgb: white background).
    np.testing.assert_array_equal(preprocess(loaded, SIZE), reference_pixels(Image.open(path))[0])


def exif_jpeg(path: Path, orientation: int) -> Image.Image:
    """A 40x20 JPEG (left half red, right half blue) with an EXIF Orientation tag."""
    image = Image.new("RGB", (40, 20), "red")
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=95)
    return image


def test_exif_rotation_is_honoured(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif_jpeg(path, orientation=6)  # stored sideways: show rotated 90 degrees clockwise
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    top, bottom = np.asarray(loaded)[2, 10], np.asarray(loaded)[37, 10]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red on top, blue below
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(hf_load_image(str(path))))
    np.testing.assert_array_equal(preprocess(loaded, SIZE),
                                  reference_pixels(hf_load_image(str(path)))[0])


def test_gif_gives_its_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "lime", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    assert np.asarray(load_image(path))[8, 8].tolist() == [255, 0, 0]


def test_sources_agree(tmp_path):
    image = sample_images()["drawing"]
    path = tmp_path / "drawing.png"
    image.save(path)
    from_path = load_image(path)
    for source in (str(path), path.read_bytes(), image):
        np.testing.assert_array_equal(np.asarray(load_image(source)), np.asarray(from_path))


def test_url_source(tmp_path):
    image = sample_images()["drawing"]
    image.save(tmp_path / "drawing.png")
    with serve(tmp_path) as base:
        loaded = load_image(f"{base}/drawing.png")
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))
        with pytest.raises(BadImage, match=r"drawing2\.png: the server answered 404"):
            load_image(f"{base}/drawing2.png")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class serve:
    """A local HTTP server over a folder, for the URL source (no network needed)."""

    def __init__(self, folder: Path):
        handler = lambda *a, **k: _Quiet(*a, directory=str(folder), **k)  # noqa: E731
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# Pan-and-scan: (width, height) -> number of crops with Google's settings.
PAN_AND_SCAN_CASES = [
    ((1001, 300), 3),  # ragged: 3 crops of 334, the last one cut to 333
    ((300, 1001), 3),  # the same, portrait
    ((600, 400), 2),
    ((2000, 600), 3),
    ((3000, 500), 4),  # 6 by ratio, capped at 4
    ((1600, 256), 4),  # 6 by ratio, capped at 4: 400x256 crops, just at the minimum
    ((1600, 255), 0),  # the same, 1 pixel short
    ((400, 300), 0),  # 2 crops of 200 < 256
    ((900, 800), 0),  # ratio 1.125 < 1.2
    ((800, 800), 0),
    ((2000, 200), 0),  # crops 500x200: height < 256
    ((1025, 513), 2),
]


@pytest.mark.parametrize("size,_", PAN_AND_SCAN_CASES)
def test_pan_and_scan_crops_equal_reference(size, _):
    image = noise(*size)
    array = np.asarray(image).transpose(2, 0, 1)  # the processor crops a CHW array
    expected = reference().pan_and_scan(array, **PAS)
    crops = pan_and_scan(image)
    assert len(crops) == len(expected)
    for crop, ref in zip(crops, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(crop).transpose(2, 0, 1), ref)


def test_pan_and_scan_counts():
    for (width, height), n in PAN_AND_SCAN_CASES:
        assert len(crop_boxes(width, height)) == n, (width, height)
    assert crop_boxes(1001, 300) == [(0, 0, 334, 300), (334, 0, 668, 300), (668, 0, 1001, 300)]


def test_pan_and_scan_full_processor_output():
    """Full image then its crops, each preprocessed: the processor's pixel_values."""
    image = noise(1001, 300)
    out = reference(do_pan_and_scan=True, **PAS)(image, return_tensors="np")
    ours = [preprocess(image, SIZE)] + [preprocess(c, SIZE) for c in pan_and_scan(image)]
    assert out["num_crops"].tolist() == [3]
    np.testing.assert_array_equal(np.stack(ours), out["pixel_values"])


def test_image_hash():
    image = sample_images()["drawing"]
    same = Image.open(io.BytesIO(_png_bytes(image)))
    assert image_hash(image) == image_hash(same) == image_hash(image.convert("RGBA"))
    assert image_hash(image) != image_hash(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert image_hash(noise(10, 20)) != image_hash(noise(20, 10))
    assert len(image_hash(image)) == 64


# Bad inputs: each a BadImage whose one-line message names the input and the fix.


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR claims width x height (CRC fixed): a bomb's header."""
    data = bytearray(_png_bytes(Image.new("RGB", (1, 1))))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture
def no_decoding(monkeypatch):
    def refuse(self):
        raise AssertionError("decoded pixels of an image that should have been refused")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def assert_one_line(err: pytest.ExceptionInfo, *parts: str):
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


def test_missing_file(tmp_path):
    with pytest.raises(BadImage) as err:
        load_image(tmp_path / "nope.png")
    assert_one_line(err, "nope.png", "no such file", "check the path")


def test_directory(tmp_path):
    with pytest.raises(BadImage) as err:
        load_image(tmp_path)
    assert_one_line(err, str(tmp_path), "not a file")


def test_text_file_renamed_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("just some text, not a picture\n")
    with pytest.raises(BadImage) as err:
        load_image(path)
    assert_one_line(err, "notes.png", "not an image", "convert it to PNG or JPEG")


def test_unsupported_format_bytes():
    with pytest.raises(BadImage) as err:
        load_image(b"\x00\x01garbage" * 10)
    assert_one_line(err, "the image bytes", "not an image")


@pytest.mark.parametrize("cut", ["truncated", "flipped"])
def test_corrupt_file(tmp_path, cut):
    data = bytearray(_png_bytes(noise(64, 64)))
    if cut == "truncated":
        data = data[: len(data) // 2]
    else:
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(64)  # zeroed pixel data: CRC and zlib both fail
    path = tmp_path / "broken.png"
    path.write_bytes(bytes(data))
    with pytest.raises(BadImage) as err:
        load_image(path)
    assert_one_line(err, "broken.png", "corrupt or truncated", "re-save or re-download")


@pytest.mark.parametrize("width,height", [(30000, 30000), (8000, 8000)])
def test_decompression_bomb_refused_before_decoding(tmp_path, no_decoding, width, height):
    # 900 MP is refused by PIL at open already; 64 MP passes PIL and is refused by our limit.
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_header_size(width, height))
    with pytest.raises(BadImage) as err:
        load_image(path)
    megapixels = f"{width * height / 1e6:.0f} megapixels"
    assert_one_line(err, "bomb.png", "too large", megapixels,
                    f"{MAX_IMAGE_PIXELS // 1_000_000} megapixel limit", "downscale it")


def test_header_size_just_under_the_limit_is_decoded(no_decoding):
    with pytest.raises(AssertionError, match="decoded pixels"):
        load_image(png_with_header_size(5000, 5000))


def test_unreachable_url():
    with pytest.raises(BadImage) as err:
        load_image("http://127.0.0.1:9/x.png")
    assert_one_line(err, "http://127.0.0.1:9/x.png", "unreachable", "check the address")


def test_not_an_image_source():
    with pytest.raises(TypeError, match="path, URL, bytes or PIL image"):
        load_image(42)


def test_sample_assets():
    assets = Path(__file__).resolve().parent.parent / "assets"
    house = load_image(assets / "house.jpg")
    assert house.size == (896, 672) and house.mode == "RGB"
    banner = load_image(assets / "banner.png")
    assert crop_boxes(*banner.size) == [(x, 0, x + 450, 450) for x in range(0, 1800, 450)]
