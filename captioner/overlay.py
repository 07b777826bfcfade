"""Attention heat maps drawn over the image (PNG), for the CLI and the service."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

#: matplotlib's "jet" colormap as 256 RGB entries, entry k = ``(jet(k / 255)[:3] * 255).astype(uint8)``:
#: exactly the colours the overlay drew with matplotlib (tests/test_overlay.py regenerates it from
#: matplotlib when that is installed), without matplotlib in the inference install.
JET = np.frombuffer(
    bytes.fromhex(
        "00007f00008400008800008d00009100009600009a00009f0000a30000a80000ac0000b10000b60000ba0000bf0000c3"
        "0000c80000cc0000d10000d50000da0000de0000e30000e80000ec0000f10000f50000fa0000fe0000ff0000ff0000ff"
        "0000ff0004ff0008ff000cff0010ff0014ff0018ff001cff0020ff0024ff0028ff002cff0030ff0034ff0038ff003cff"
        "0040ff0044ff0048ff004cff0050ff0054ff0058ff005cff0060ff0064ff0068ff006cff0070ff0074ff0078ff007cff"
        "0080ff0084ff0088ff008cff0090ff0094ff0098ff009cff00a0ff00a4ff00a8ff00acff00b0ff00b4ff00b8ff00bcff"
        "00c0ff00c4ff00c8ff00ccff00d0ff00d4ff00d8ff00dcfe00e0fa00e4f702e8f405ecf108f0ed0cf4ea0ff8e712fce4"
        "15ffe118ffdd1cffda1fffd722ffd425ffd029ffcd2cffca2fffc732ffc336ffc039ffbd3cffba3fffb742ffb346ffb0"
        "49ffad4cffaa4fffa653ffa356ffa059ff9d5cff9a5fff9663ff9366ff9069ff8d6cff8970ff8673ff8376ff8079ff7d"
        "7cff7980ff7683ff7386ff7089ff6c8dff6990ff6693ff6396ff5f9aff5c9dff59a0ff56a3ff53a6ff4faaff4cadff49"
        "b0ff46b3ff42b7ff3fbaff3cbdff39c0ff36c3ff32c7ff2fcaff2ccdff29d0ff25d4ff22d7ff1fdaff1cddff18e0ff15"
        "e4ff12e7ff0feaff0cedff08f1fc05f4f802f7f400faf000feed00ffe900ffe500ffe200ffde00ffda00ffd700ffd300"
        "ffcf00ffcb00ffc800ffc400ffc000ffbd00ffb900ffb500ffb100ffae00ffaa00ffa600ffa300ff9f00ff9b00ff9800"
        "ff9400ff9000ff8c00ff8900ff8500ff8100ff7e00ff7a00ff7600ff7300ff6f00ff6b00ff6700ff6400ff6000ff5c00"
        "ff5900ff5500ff5100ff4d00ff4a00ff4600ff4200ff3f00ff3b00ff3700ff3400ff3000ff2c00ff2800ff2500ff2100"
        "ff1d00ff1a00ff1600fe1200fa0f00f50b00f10700ec0300e80000e30000de0000da0000d50000d10000cc0000c80000"
        "c30000bf0000ba0000b60000b10000ac0000a80000a300009f00009a00009600009100008d00008800008400007f0000"
    ),
    dtype=np.uint8,
).reshape(256, 3)


def render_overlay(image: Image.Image, attention: np.ndarray, opacity: float = 0.55) -> Image.Image:
    """Blend one word's attention grid (H, W) over ``image`` (RGB), upsampled smoothly to its size."""
    grid = np.asarray(attention, dtype=np.float32)
    if grid.ndim != 2:
        raise ValueError(f"attention must be (H, W), got {grid.shape}")
    peak = float(grid.max())
    norm = grid / peak if peak > 0 else grid  # (H, W) in [0, 1]
    heat = Image.fromarray((norm * 255).astype(np.uint8)).resize(image.size, Image.BICUBIC)
    colour_img = Image.fromarray(JET[np.asarray(heat)])  # (h, w, 3) uint8
    return Image.blend(image.convert("RGB"), colour_img, opacity)


def overlay_png(image: Image.Image, attention: np.ndarray, max_side: int = 384, **kwargs) -> bytes:
    """PNG bytes of :func:`render_overlay`, the image first scaled to at most ``max_side`` pixels."""
    img = image.convert("RGB")
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.BICUBIC)
    buf = io.BytesIO()
    render_overlay(img, attention, **kwargs).save(buf, format="PNG", optimize=False)
    return buf.getvalue()
