"""Decode cost of the worst allowed images: wall time and peak memory, in a decode worker.

Builds files at the pixel limit (7000 x 7000 = 49 M pixels, just under the default 50 M) in each
allowed format and the costly variants (alpha, 16-bit, float, CMYK, progressive JPEG with many
scans, RLE BMP decoded by Pillow's Python RLE decoder, deflate/LZW bombs, many frames), then
decodes each one in a fresh one-worker :class:`captioner.decode_pool.DecodePool` with the
service's default limits, exactly as the service does (model size 260, overlay thumbnail 320).
For every file it prints the outcome, the wall time and the worker's peak RSS growth
(``VmHWM`` minus the RSS before the decode). ``--no-limits`` runs without the time and memory caps,
to see what the caps cut off.

    .venv/bin/python bench/bench_decode.py [--only NAME ...] [--no-limits] [--json OUT]
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from captioner.decode_pool import DecodePool
from captioner.images import ImageError
from service.config import load_settings

DEFAULTS = load_settings({}, {})  # the service's default limits

SIDE = 7000  # 49 M pixels


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _gradient(mode: str = "RGB", side: int = SIDE) -> Image.Image:
    ramp = Image.linear_gradient("L").resize((side, side))
    if mode == "L":
        return ramp
    bands = {"RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    return Image.merge(
        mode,
        [ramp, ramp.transpose(Image.Transpose.ROTATE_90), ramp.transpose(Image.Transpose.FLIP_TOP_BOTTOM), ramp][
            :bands
        ],
    )


def many_scan_jpeg(copies: int = 400) -> bytes:
    """A progressive 7000x7000 JPEG whose last scan is repeated ``copies`` times: every scan is a
    pass over the whole coefficient buffer, so the cost grows with the scans, not with the pixels."""
    data = _save(_gradient("RGB"), "JPEG", progressive=True, quality=30)
    sos = data.rfind(b"\xff\xda")
    last = data[sos:-2]  # the final scan, up to EOI
    return data[:-2] + last * copies + b"\xff\xd9"


def rle_bmp(budget: int = 19 * 2**20) -> bytes:
    """An RLE8 BMP, 7000x7000, whose rows are runs of one pixel (2 bytes per pixel) until the upload
    budget is spent: Pillow's RLE decoder is Python, one loop turn per run."""
    rows = []
    used = 0
    row_full = b"\x01\x07" * SIDE + b"\x00\x00"
    for _ in range(SIDE):
        row = row_full if used + len(row_full) < budget else b"\x00\x00"
        used += len(row)
        rows.append(row)
    pixels = b"".join(rows) + b"\x00\x01"
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, SIDE, SIDE, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def gif_frames(frames: int = 2000) -> bytes:
    """A 7000x7000 GIF (one colour: an LZW bomb) followed by many 1x1 frames."""
    data = _save(Image.new("P", (SIDE, SIDE), 1), "GIF")[:-1]  # drop the trailer
    frame = (
        b"\x21\xf9\x04\x00\x00\x00\x00\x00" + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    )
    return data + frame * frames + b"\x3b"


def multipage_tiff(pages: int = 3000) -> bytes:
    first = _gradient("RGB")
    return _save(
        first, "TIFF", compression="tiff_adobe_deflate", save_all=True, append_images=[Image.new("L", (1, 1))] * pages
    )


FILES = {
    "png-rgba-7000": lambda: _save(_gradient("RGBA"), "PNG", compress_level=1),
    "png-16bit-grey-7000": lambda: _save(Image.fromarray(np.asarray(_gradient("L"), dtype=np.uint16) * 257), "PNG"),
    "png-solid-7000 (deflate bomb)": lambda: _save(Image.new("RGB", (SIDE, SIDE)), "PNG", compress_level=9),
    "jpeg-7000 (overlay)": lambda: _save(_gradient("RGB"), "JPEG", quality=90),
    "jpeg-cmyk-7000": lambda: _save(_gradient("CMYK"), "JPEG", quality=90),
    "jpeg-progressive-7000-400-scans": many_scan_jpeg,
    "tiff-float-7000-deflate": lambda: _save(
        Image.fromarray(np.asarray(_gradient("L"), dtype=np.float32)), "TIFF", compression="tiff_adobe_deflate"
    ),
    "tiff-rgb-7000-lzw": lambda: _save(_gradient("RGB"), "TIFF", compression="tiff_lzw"),
    "tiff-7000-plus-3000-pages": multipage_tiff,
    "webp-lossless-7000": lambda: _save(_gradient("RGB"), "WEBP", lossless=True, quality=0, method=0),
    "gif-7000-plus-2000-frames": lambda: gif_frames(2000),
    "bmp-rle8-7000 (python decoder)": rle_bmp,
}


def measure(name: str, data: bytes, limits: bool) -> dict:
    pool = DecodePool(
        1,
        timeout_s=DEFAULTS.decode_timeout_s if limits else 600.0,
        memory_mb=DEFAULTS.decode_memory_mb if limits else 0,
    ).start()
    try:
        (worker,) = pool._idle
        status = Path(f"/proc/{worker.proc.pid}/status")
        before = _field(status, "VmRSS")
        t0 = time.perf_counter()
        try:
            side = DEFAULTS.overlay_max_side
            out = pool.decode(
                data,
                260,
                max_pixels=DEFAULTS.max_pixels,
                draft_size=side if "overlay" in name else 260,
                thumbnail_side=side if "overlay" in name else 0,
            )
            result = "decoded {}x{}".format(*out.original_size)
        except ImageError as exc:
            result = f"{exc.code}: {exc}"[:90]
        seconds = time.perf_counter() - t0
        peak = _field(status, "VmHWM") if status.exists() else float("nan")  # a killed worker is gone
    finally:
        pool.close()
    return {
        "file": name,
        "upload_mb": round(len(data) / 2**20, 2),
        "result": result,
        "seconds": round(seconds, 2),
        "peak_rss_growth_mb": round(peak - before, 1),
    }


def _field(status: Path, name: str) -> float:
    for line in status.read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="substrings of file names to run")
    parser.add_argument("--no-limits", action="store_true", help="no time or memory cap (what the caps cut off)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for name, build in FILES.items():
        if args.only and not any(s in name for s in args.only):
            continue
        data = build()
        row = measure(name, data, not args.no_limits)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
