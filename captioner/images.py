"""Image loading and preprocessing: the one path every caller uses.

Training, evaluation, the batch CLI and the service all go through
:func:`load_image` (bytes/path/PIL -> RGB PIL image, safely) and
:func:`preprocess` (RGB PIL image -> normalised tensor).
"""
from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Union

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes], Image.Image]

#: Images larger than this many pixels are refused before their pixels are decoded.
DEFAULT_MAX_PIXELS = 50_000_000

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)

# Truncated files must raise, not be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: Formats never opened: Pillow renders EPS by running Ghostscript (an external program) on a
#: temporary copy of the data, so untrusted input would reach another parser and the disk.
BLOCKED_FORMATS = frozenset({"EPS"})


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


def _formats() -> list[str]:
    """Every format Pillow can open except :data:`BLOCKED_FORMATS`."""
    Image.init()
    return [f for f in Image.ID if f not in BLOCKED_FORMATS]


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("empty image data")
        return Image.open(io.BytesIO(bytes(source)), formats=_formats())
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"no such image file: {path}", code="not_found")
        if path.stat().st_size == 0:
            raise ImageError(f"empty file: {path}")
        return Image.open(path, formats=_formats())
    if hasattr(source, "read"):
        return Image.open(source, formats=_formats())
    raise TypeError(f"unsupported image source type: {type(source).__name__}")


def load_image(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Open any Pillow-readable image as an upright 8-bit RGB image.

    Applies EXIF orientation, takes the first frame of animations, converts every
    mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to RGB with alpha composited on white,
    and refuses images whose header claims more than ``max_pixels`` pixels
    *before* decoding them (decompression bombs). ``draft_size`` lets JPEG decode
    at a reduced scale (DCT scaling) when only a small image is needed. The size
    given in the file's header is kept in ``info["original_size"]``.

    Raises:
        ImageError: the data is not a decodable image, or is too large.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _open(source)
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError("image has no pixels")
            if w * h > max_pixels:
                raise ImageError(
                    f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}", code="too_large"
                )
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            if getattr(img, "is_animated", False):
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
            rgb.info["original_size"] = (w, h)
            return rgb
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large: {exc}", code="too_large") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error,
            IndexError, KeyError, ZeroDivisionError) as exc:  # Pillow's plugins raise all of these on corrupt data
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


def preprocess(img: Image.Image, size: int, norm: Normalization = LITE_NORM) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, size, size), normalised for the encoder.

    The whole image is resized to a square (no crop), so nothing at the borders
    that a caption may mention is cut away.
    """
    if img.mode != "RGB":
        img = _to_rgb(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())  # (S, S, 3)
    mean = torch.tensor(norm.mean, dtype=torch.float32)
    std = torch.tensor(norm.std, dtype=torch.float32)
    arr = (arr - mean) / std
    return arr.permute(2, 0, 1).contiguous()  # (3, S, S)


def load_and_preprocess(
    source: ImageSource, size: int, norm: Normalization = LITE_NORM, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Load + preprocess in one call. Returns the tensor (3, S, S) and the original (width, height)."""
    img = load_image(source, max_pixels=max_pixels, draft_size=size)
    return preprocess(img, size, norm), img.info.get("original_size", img.size)
