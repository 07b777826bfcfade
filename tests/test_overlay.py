"""The attention overlay draws with a 256-entry copy of matplotlib's "jet" colormap: the same pixels as
when it called matplotlib, which the service image no longer carries."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from captioner.overlay import JET, overlay_png, render_overlay

from conftest import make_image

matplotlib = pytest.importorskip("matplotlib", reason="matplotlib comes with the [train] extra")


def _matplotlib_overlay(image: Image.Image, attention: np.ndarray, opacity: float = 0.55) -> Image.Image:
    """render_overlay as it was with matplotlib (the reference)."""
    from matplotlib import colormaps

    grid = np.asarray(attention, dtype=np.float32)
    peak = float(grid.max())
    norm = grid / peak if peak > 0 else grid
    heat = Image.fromarray((norm * 255).astype(np.uint8)).resize(image.size, Image.BICUBIC)
    colours = colormaps["jet"](np.asarray(heat, dtype=np.float32) / 255.0)[..., :3]
    return Image.blend(image.convert("RGB"), Image.fromarray((colours * 255).astype(np.uint8)), opacity)


def test_table_is_matplotlibs_jet():
    from matplotlib import colormaps

    expected = (colormaps["jet"](np.arange(256, dtype=np.float32) / 255.0)[:, :3] * 255).astype(np.uint8)
    assert JET.shape == (256, 3) and JET.dtype == np.uint8
    np.testing.assert_array_equal(JET, expected)


@pytest.mark.parametrize("seed", range(6))
def test_overlay_pixels_match_the_matplotlib_version(seed):
    rng = np.random.default_rng(seed)
    image = make_image(seed, size=(int(rng.integers(20, 300)), int(rng.integers(20, 300))))
    grid = rng.random((int(rng.integers(1, 15)), int(rng.integers(1, 15)))) ** 3  # peaked, like attention
    if seed == 0:
        grid[:] = 0.0  # all-zero attention: no division by zero
    ours, reference = render_overlay(image, grid), _matplotlib_overlay(image, grid)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))
    png = Image.open(io.BytesIO(overlay_png(image, grid, max_side=64)))
    assert png.format == "PNG" and max(png.size) <= 64
