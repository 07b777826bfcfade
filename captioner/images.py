"""Image loading and preprocessing: the one path every caller uses.

Training, evaluation, the batch CLI and the service all go through
:func:`load_image` (bytes/path/PIL -> RGB PIL image, safely) and
:func:`preprocess` (RGB PIL image -> normalised tensor).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported where tensors are made, so that decode workers (decode_pool.py) need no torch
    import torch

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | Image.Image

#: Images larger than this many pixels are refused before their pixels are decoded.
DEFAULT_MAX_PIXELS = 50_000_000

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".mpo"}
)

# Truncated files must raise, not be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: The only formats opened (Pillow's names). An allow-list, not a deny-list: other plugins run external
#: programs (EPS: Ghostscript), reopen inner data with every plugin (IPTC), or decode in pure Python
#: at seconds per MB (FITS, QOI). These six decode in C, and none of their plugins opens another file.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
#: What Pillow may call a file it opened with an allowed plugin: the JPEG plugin names a JPEG with a
#: multi-picture index (phones, 3D cameras) "MPO"; its first frame is a plain JPEG.
OPENED_AS = frozenset(ALLOWED_FORMATS) | {"MPO"}

# Pillow raises DecompressionBombError at 2 x MAX_IMAGE_PIXELS and only warns above 1 x; load_image
# refuses everything above its own limit itself, so the warning would only repeat that.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageError(ValueError):
    """An input that is not a usable image.

    ``code`` is machine readable: ``undecodable``, ``too_large`` or ``not_found``.
    """

    def __init__(self, message: str, code: str = "undecodable") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Normalization:
    """Per-channel normalisation applied after scaling pixels to [0, 255]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


#: EfficientNet-Lite was trained on (x - 127) / 128; torchvision ResNets on ImageNet statistics.
LITE_NORM = Normalization((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))
IMAGENET_NORM = Normalization((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension we read from folders."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _open(source: ImageSource) -> Image.Image:
    """Open with the allowed plugins only; the result's format is checked too (nothing smuggled)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("empty image data")
        img = Image.open(io.BytesIO(bytes(source)), formats=ALLOWED_FORMATS)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"no such image file: {path}", code="not_found")
        if path.stat().st_size == 0:
            raise ImageError(f"empty file: {path}")
        img = Image.open(path, formats=ALLOWED_FORMATS)
    elif hasattr(source, "read"):
        img = Image.open(source, formats=ALLOWED_FORMATS)
    else:
        raise TypeError(f"unsupported image source type: {type(source).__name__}")
    if img.format not in OPENED_AS:  # pragma: no cover - Image.open(formats=...) already ensures it
        raise ImageError(f"{img.format} images are not accepted")
    return img


def load_image(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Open a JPEG, PNG, GIF, WebP, BMP or TIFF image as an upright 8-bit RGB image.

    Only :data:`ALLOWED_FORMATS` are opened. Applies EXIF orientation, takes the first
    frame of animations, converts every mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to
    RGB with alpha composited on white, and refuses images whose header claims more
    than ``max_pixels`` pixels *before* decoding them (decompression bombs); Pillow's own
    ``Image.MAX_IMAGE_PIXELS`` is set to the same limit (process-wide). ``draft_size``
    lets JPEG decode at a reduced scale (DCT scaling) when only a small image is needed.
    The decoded size must be the declared one. The size given in the file's header is
    kept in ``info["original_size"]``.

    Raises:
        ImageError: the data is not an allowed, decodable image (``undecodable``, also for
            any exception a decoder raises, ``RecursionError`` included), is too large or
            ran out of memory (``too_large``), or the file is missing (``not_found``).
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        img = _open(source)
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageError("image has no pixels")
        if w * h > max_pixels:
            raise ImageError(f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}", code="too_large")
        if draft_size and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (draft_size, draft_size))
        declared = img.size  # after draft: the reduced size the decoder will produce
        img.load()  # the first frame: the image is at frame 0 after open
        if img.size != declared:
            raise ImageError(
                f"the image decoded to {img.size[0]}x{img.size[1]}, not its declared {declared[0]}x{declared[1]}"
            )
        img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img)
        rgb.info["original_size"] = (w, h)
        return rgb
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not a JPEG, PNG, GIF, WebP, BMP or TIFF image (no other format is accepted)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc}", code="too_large") from exc
    except MemoryError:
        raise ImageError("image needs more memory to decode than is available", code="too_large") from None
    except Exception as exc:
        raise ImageError(f"cannot decode image: {exc or type(exc).__name__}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited on white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.array(img, dtype=np.float32)  # (H, W); float32 + in-place: ~4 bytes/pixel, not 3 x 8
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr -= lo
        arr *= scale
        np.clip(arr, 0, 255, out=arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")  # uint8 (H, W) -> mode L
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba)  # blends by the alpha band; no full-size RGBA background or copies
        return out
    return img.convert("RGB")


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """RGB PIL image -> RGB (size, size): the whole image, no crop, so nothing at the borders that a
    caption may mention is cut away. The resize step of :func:`preprocess`."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    return img


def preprocess(img: Image.Image, size: int, norm: Normalization = LITE_NORM) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, size, size), normalised for the encoder (after :func:`resize_square`)."""
    import torch

    img = resize_square(img, size)
    # channels first while still bytes (a cheap copy), then contiguous per-channel arithmetic: the same
    # float32 (x - mean) / std per element as on (S, S, 3), about 10x faster than broadcasting over its last axis
    arr = torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))).float()  # (3, S, S)
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(3, 1, 1)
    return arr.sub_(mean).div_(std)  # (3, S, S)


def load_and_preprocess(
    source: ImageSource, size: int, norm: Normalization = LITE_NORM, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Load + preprocess in one call. Returns the tensor (3, S, S) and the original (width, height)."""
    img = load_image(source, max_pixels=max_pixels, draft_size=size)
    return preprocess(img, size, norm), img.info.get("original_size", img.size)
