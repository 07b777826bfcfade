"""Attention heat maps drawn over the image (PNG), for the CLI and the service."""
from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from PIL import Image


def render_overlay(image: Image.Image, attention: np.ndarray, opacity: float = 0.55, cmap: str = "jet") -> Image.Image:
    """Blend one word's attention grid (H, W) over ``image`` (RGB), upsampled smoothly to its size."""
    grid = np.asarray(attention, dtype=np.float32)
    if grid.ndim != 2:
        raise ValueError(f"attention must be (H, W), got {grid.shape}")
    peak = float(grid.max())
    norm = grid / peak if peak > 0 else grid  # (H, W) in [0, 1]
    heat = Image.fromarray((norm * 255).astype(np.uint8)).resize(image.size, Image.BICUBIC)
    colours = colormaps[cmap](np.asarray(heat, dtype=np.float32) / 255.0)[..., :3]  # (h, w, 3)
    colour_img = Image.fromarray((colours * 255).astype(np.uint8))
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
