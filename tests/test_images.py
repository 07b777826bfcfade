"""The one preprocessing path: any mode/format -> upright RGB -> normalised tensor."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.images import LITE_NORM, ImageError, load_and_preprocess, load_image, preprocess

from conftest import image_bytes, make_image


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "PA"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    img = make_image(1).convert("RGBA" if mode == "PA" else "RGB")
    if mode == "PA":
        img = img.convert("P").convert("PA")
    elif mode == "I;16":
        arr = np.asarray(img.convert("L"), dtype=np.uint16) * 257
        img = Image.fromarray(arr)  # uint16 -> mode I;16
    else:
        img = img.convert(mode)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == img.size


def test_sixteen_bit_png_keeps_contrast() -> None:
    arr = np.linspace(0, 65535, 64 * 32, dtype=np.uint16).reshape(32, 64)
    data = image_bytes(Image.fromarray(arr), "PNG")
    rgb = np.asarray(load_image(data))
    assert rgb.min() == 0 and rgb.max() == 255


def test_alpha_is_composited_on_white() -> None:
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(load_image(transparent))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied() -> None:
    img = make_image(2, size=(80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = image_bytes(img, "JPEG", exif=exif.tobytes())
    out = load_image(data)
    assert out.size == (40, 80)
    assert out.info["original_size"] == (80, 40)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP", "BMP", "TIFF", "JPEG"])
def test_formats_from_bytes_path_and_file(fmt: str, tmp_path) -> None:
    data = image_bytes(make_image(3), fmt)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    for src in (data, str(path), path, io.BytesIO(data)):
        assert load_image(src).size == (96, 72)


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(buf.getvalue()))[0, 0, 0] > 200


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"<html><body>hi</body></html>", b"%PDF-1.4\n...", b"PK\x03\x04zipzip"],
)
def test_garbage_raises_image_error(data: bytes) -> None:
    with pytest.raises(ImageError):
        load_image(data)


def test_truncated_jpeg_raises() -> None:
    data = image_bytes(make_image(4, size=(200, 200)), "JPEG")
    with pytest.raises(ImageError):
        load_image(data[: len(data) // 2])


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A few hundred bytes whose header claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding() -> None:
    with pytest.raises(ImageError) as err:
        load_image(bomb_png(30000, 30000))
    assert err.value.code == "too_large"
    with pytest.raises(ImageError) as err:  # below Pillow's own limit, above ours
        load_image(bomb_png(9000, 9000))
    assert err.value.code == "too_large"
    with pytest.raises(ImageError) as err:
        load_image(make_image(5, size=(300, 300)), max_pixels=1000)
    assert err.value.code == "too_large"


def test_missing_file() -> None:
    with pytest.raises(ImageError) as err:
        load_image("/nonexistent/photo.jpg")
    assert err.value.code == "not_found"


def test_preprocess_shape_range_and_determinism() -> None:
    img = make_image(6)
    x = preprocess(img, 64, LITE_NORM)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0 + 1e-6  # (v - 127) / 128
    assert torch.equal(x, preprocess(img, 64, LITE_NORM))
    # channel order is RGB: a pure red image has a high first channel
    red = preprocess(Image.new("RGB", (8, 8), (255, 0, 0)), 8)
    assert red[0].mean() > 0.9 and red[1].mean() < -0.9


def test_load_and_preprocess_matches_the_two_steps() -> None:
    data = image_bytes(make_image(7), "PNG")
    x, size = load_and_preprocess(data, 48)
    assert size == (96, 72)
    assert torch.equal(x, preprocess(load_image(data), 48))


def test_preprocess_normalises_each_channel_and_keeps_the_whole_frame() -> None:
    """(v - mean) / std per channel, RGB order; the image is squeezed to a square, never cropped."""
    from captioner.images import IMAGENET_NORM

    solid = Image.new("RGB", (8, 8), (255, 0, 64))
    lite = preprocess(solid, 8, LITE_NORM)
    torch.testing.assert_close(lite[:, 0, 0], torch.tensor([128 / 128, -127 / 128, -63 / 128]))
    imagenet = preprocess(solid, 8, IMAGENET_NORM)
    expected = [(255 - 123.675) / 58.395, (0 - 116.28) / 57.12, (64 - 103.53) / 57.375]
    torch.testing.assert_close(imagenet[:, 0, 0], torch.tensor(expected))
    wide = Image.new("RGB", (64, 16), (255, 255, 255))
    wide.paste((0, 0, 0), (0, 0, 8, 16))  # a black band along the left edge
    x = preprocess(wide, 16, LITE_NORM)  # (3, 16, 16)
    assert float(x[:, :, 0].max()) < -0.9 and float(x[:, :, -1].min()) > 0.9  # the band is still there
