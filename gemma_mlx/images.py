"""Images in: decode and validate what a user gives, then preprocess as Gemma 3's processor does.

`load_image` turns a path, URL, bytes or PIL image into an upright RGB picture, refusing
decompression bombs from the header before any pixel is decoded; every failure is a `BadImage`
with a one-line message that names the input and the fix. `preprocess` and `pan_and_scan` are
ports of transformers' PIL Gemma 3 image processor (`Gemma3ImageProcessorPil`) with the values
of Google's `preprocessor_config.json`, and give the same numbers.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImage

ImageSource = str | Path | bytes | Image.Image

MAX_IMAGE_PIXELS = 50_000_000  # 150 MB decoded as RGB; the model sees 896x896 anyway
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
URL_TIMEOUT_S = 20.0
IMAGE_SIZE = 896
RESCALE_FACTOR = 1 / 255  # Google's config writes 0.00392156862745098, the same float64
IMAGE_MEAN = IMAGE_STD = 0.5


def load_image(source: ImageSource) -> Image.Image:
    """An upright RGB image from a file path, an http(s) URL, encoded bytes or a PIL image.

    EXIF orientation is applied, an animation gives its first frame, and transparency is
    composited onto white (as the reference processor's `convert_to_rgb` does)."""
    if isinstance(source, Image.Image):
        _check_size(source, "the image")
        return to_rgb(ImageOps.exif_transpose(source))
    if isinstance(source, bytes):
        return _decode(io.BytesIO(source), "the image bytes")
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return _decode(io.BytesIO(_download(source)), source)
    if isinstance(source, (str, Path)):
        return _decode_file(Path(source))
    raise TypeError(f"an image is a path, URL, bytes or PIL image, not {type(source).__name__}")


def _decode_file(path: Path) -> Image.Image:
    if not path.exists():
        raise BadImage(f"{path}: no such file; check the path")
    if not path.is_file():
        raise BadImage(f"{path} is not a file; give the path of an image file")
    try:
        with path.open("rb") as f:
            return _decode(f, str(path))
    except PermissionError as e:
        raise BadImage(f"{path}: permission denied; check the file's permissions") from e


def _decode(fp, name: str) -> Image.Image:
    """Open lazily, check the header's size, and only then decode."""
    try:
        with warnings.catch_warnings():
            # PIL warns above its own (larger) limit; we refuse on ours just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
    except Image.DecompressionBombError as e:  # PIL's own refusal, far above our limit
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        _refuse_size(name, int(pixels.group(1)) if pixels else None, e)
    except UnidentifiedImageError as e:
        raise BadImage(f"{name} is not an image in a format PIL can read; "
                       "convert it to PNG or JPEG") from e
    with image:
        _check_size(image, name)
        try:
            image.load()  # the first frame of an animation
            return to_rgb(ImageOps.exif_transpose(image))
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise BadImage(f"{name} is corrupt or truncated ({e}); "
                           "re-save or re-download it") from e


def _check_size(image: Image.Image, name: str) -> None:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        _refuse_size(name, width * height, size=f"{width}x{height}, ")
    if width == 0 or height == 0:
        raise BadImage(f"{name} is empty ({width}x{height}); give a picture with pixels")


def _refuse_size(name: str, pixels: int | None, cause: Exception | None = None,
                 size: str = "") -> None:
    what = f" ({size}{pixels / 1e6:.0f} megapixels)" if pixels else ""
    raise BadImage(f"{name} is too large{what}: over the {MAX_IMAGE_PIXELS // 1_000_000} "
                   "megapixel limit, refused before decoding; downscale it first") from cause


def _download(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "gemma-mlx"})
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT_S) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise BadImage(f"{url}: the server answered {e.code} {e.reason}; check the address") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise BadImage(f"{url} is unreachable ({reason}); check the address and your "
                       "connection, or download it and give the file") from e
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise BadImage(f"{url} is over {MAX_DOWNLOAD_BYTES >> 20} MB; "
                       "download and downscale it first")
    return data


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white: transformers' `convert_to_rgb`."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """pixel_values [3, image_size, image_size] float32 in [-1, 1], as the reference makes them.

    The same steps and dtypes as `Gemma3ImageProcessorPil`: PIL bilinear resize of the uint8
    image (no aspect ratio kept), x * (1/255) in float64 rounded to float32, then
    (x - 0.5) / 0.5 in float32."""
    rgb = to_rgb(image).resize((image_size, image_size), resample=Image.Resampling.BILINEAR)
    x = (np.asarray(rgb, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)
    x = (x - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def pan_and_scan(image: Image.Image, min_crop_size: int = 256, max_num_crops: int = 4,
                 min_ratio_to_activate: float = 1.2) -> list[Image.Image]:
    """The extra crops of a long image (none for one close to square); each is preprocessed
    and shown to the model as one more image after the full one. Defaults are Google's."""
    boxes = crop_boxes(*image.size, min_crop_size, max_num_crops, min_ratio_to_activate)
    return [image.crop(box) for box in boxes]


def crop_boxes(width: int, height: int, min_crop_size: int = 256, max_num_crops: int = 4,
               min_ratio_to_activate: float = 1.2) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of each pan-and-scan crop, the rule of transformers'
    `Gemma3ImageProcessor.pan_and_scan`: split the long side into about `long / short` equal
    crops, 2 to `max_num_crops` of them, none shorter than `min_crop_size` on either side."""
    long_side, short_side = max(width, height), min(width, height)
    if long_side / short_side < min_ratio_to_activate:
        return []
    n = int(math.floor(long_side / short_side + 0.5))  # round half up
    n = min(int(math.floor(long_side / min_crop_size)), n)
    n = min(max_num_crops, max(2, n))
    n_w, n_h = (n, 1) if width >= height else (1, n)
    crop_w, crop_h = math.ceil(width / n_w), math.ceil(height / n_h)
    if min(crop_w, crop_h) < min_crop_size:
        return []
    # The last crop is cut at the edge (the reference slices an array; PIL would pad).
    return [(x, y, min(x + crop_w, width), min(y + crop_h, height))
            for y in range(0, n_h * crop_h, crop_h) for x in range(0, n_w * crop_w, crop_w)]


def image_hash(image: Image.Image) -> str:
    """A content hash of the decoded RGB pixels and size: the key for cached vision features,
    the same for the same picture whatever file, format or metadata it came in."""
    rgb = to_rgb(image)
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


@dataclass
class Attachment:
    """An image in a message: the decoded picture, its content hash and where it came from."""

    image: Any  # PIL.Image.Image, RGB
    hash: str
    source: str | None = None  # a path or URL, for saving; None for bytes / PIL input

    @classmethod
    def load(cls, source: ImageSource) -> Attachment:
        image = load_image(source)
        return cls(image, image_hash(image), _where(source))


def _where(source: ImageSource) -> str | None:
    """What a saved chat refers to: a URL as given, a file by its absolute path (a relative
    one would be looked up beside the saved chat, not in the folder it was given from)."""
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return source
    if isinstance(source, (str, Path)):
        return str(Path(source).resolve())
    return None
