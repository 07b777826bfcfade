"""Crafted files of every format outside the allow-list, and decodes that cost too much.

Every file is generated here. Each one is first shown to be what it claims: unrestricted Pillow
identifies it as that format. Then the library (``load_image``, which the CLI uses) refuses it, and
the service answers a JSON 4xx within 3 s, starts no program (a fake ``gs`` on PATH), and stays
ready. The decode pool kills a decode that runs too long and caps the memory of one.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from captioner.api import Captioner
from captioner.commands.main import main
from captioner.decode_pool import DecodePool, PoolBusy
from captioner.images import ALLOWED_FORMATS, ImageError, load_image
from service.app import EXTENSION_KEY, create_app

from conftest import image_bytes, make_image

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"


# ---------------------------------------------------------------- builders
def iptc_field(record: int, dataset: int, data: bytes) -> bytes:
    if len(data) < 0x8000:
        return bytes((0x1C, record, dataset)) + struct.pack(">H", len(data)) + data
    return bytes((0x1C, record, dataset, 0x84, 0)) + struct.pack(">I", len(data)) + data  # extended length


def iptc(inner: bytes, width: int = 1, height: int = 1) -> bytes:
    """An IPTC/NAA image: a 1x1 grey 'JPEG-compressed' header whose data is ``inner`` (reopened by Pillow
    with every plugin when loaded)."""
    return (
        iptc_field(3, 60, b"\x01\x00")
        + iptc_field(3, 20, struct.pack(">I", width))
        + iptc_field(3, 30, struct.pack(">I", height))
        + iptc_field(3, 120, b"\x05")
        + iptc_field(8, 10, inner)
    )


def nested_iptc(depth: int = 1500) -> bytes:
    data = image_bytes(Image.new("L", (1, 1)), "PNG")
    for _ in range(depth):
        data = iptc(data)
    return data


def rgba_png_zeros(side: int) -> bytes:
    """A real side x side RGBA PNG of zeros, streamed through zlib (never held as pixels)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + 4 * side)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def fits_card(key: str, value: str = "") -> bytes:
    return (f"{key:<8}= {value:>20}" if value else f"{key:<80}").ljust(80).encode()


def fits_gzip_bomb(side: int = 7000) -> bytes:
    """A FITS file with a GZIP_1 tile-compressed 7000x7000 image (Pillow decodes it in Python)."""
    tile = zlib.compress(b"\x00" * side, 9)
    gz = (
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
        + zlib.compress(b"\x00" * side * side, 9)[2:-4]
        + struct.pack("<II", 0, (side * side) & 0xFFFFFFFF)
    )
    del tile
    primary = b"".join(
        [
            fits_card("SIMPLE", "T"),
            fits_card("BITPIX", "8"),
            fits_card("NAXIS", "0"),
            fits_card("EXTEND", "T"),
            fits_card("END"),
        ]
    )
    ext = b"".join(
        [
            fits_card("XTENSION", "'BINTABLE'"),
            fits_card("BITPIX", "8"),
            fits_card("NAXIS", "2"),
            fits_card("NAXIS1", "8"),
            fits_card("NAXIS2", "1"),
            fits_card("PCOUNT", str(len(gz))),
            fits_card("GCOUNT", "1"),
            fits_card("TFIELDS", "1"),
            fits_card("TFORM1", "'1PB'"),
            fits_card("ZIMAGE", "T"),
            fits_card("ZCMPTYPE", "'GZIP_1'"),
            fits_card("ZBITPIX", "8"),
            fits_card("ZNAXIS", "2"),
            fits_card("ZNAXIS1", str(side)),
            fits_card("ZNAXIS2", str(side)),
            fits_card("END"),
        ]
    )
    pad = lambda b: b + b" " * (-len(b) % 2880)  # noqa: E731
    table = struct.pack(">ii", len(gz), 0)
    return pad(primary) + pad(ext) + (table + gz).ljust(-(-len(table + gz) // 2880) * 2880, b"\x00")


def saved(fmt: str, mode: str = "RGB", size: tuple[int, int] = (16, 12), **kwargs) -> bytes:
    return image_bytes(
        make_image(1, size, mode) if mode in ("RGB", "L") else make_image(1, size).convert(mode), fmt, **kwargs
    )


def pcx_in_dcx() -> bytes:
    pcx = saved("PCX")
    return struct.pack("<II", 0x3ADE68B1, 12) + struct.pack("<I", 0) + pcx


def handmade() -> dict[str, bytes]:
    """Formats Pillow opens but cannot write: magic bytes plus a plausible header."""
    return {
        "BUFR": b"BUFR" + b"\x00\x00\x40\x04" + b"\x00" * 60,
        "GRIB": b"GRIB" + b"\x00\x00\x00\x02" + b"\x00" * 60,
        "HDF5": b"\x89HDF\r\n\x1a\n" + b"\x00" * 64,
        "CUR": b"\x00\x00\x02\x00\x01\x00"
        + bytes((16, 16, 0, 0))
        + struct.pack("<HHII", 1, 1, 40 + 1024, 22)
        + saved("BMP", size=(16, 32))[14:],
        "DCX": pcx_in_dcx(),
        "FITS": fits_gzip_bomb(),
        "FLI": struct.pack("<IHHHHHH", 128 + 16, 0xAF11, 1, 16, 12, 8, 0)
        + b"\x00" * 110
        + struct.pack("<IHH", 16, 0xF1FA, 0)
        + b"\x00" * 8,
        "FTEX": b"FTEX"
        + struct.pack("<iiiiii", 0, 16, 12, 1, 0, 0)
        + struct.pack("<ii", 1, 0)
        + struct.pack("<ii", 16 * 12 * 3 + 4, 1)
        + b"\x00" * 4
        + b"\x7f" * (16 * 12 * 3),
        "GBR": struct.pack(">IIIII", 28 + 6, 2, 16, 12, 1)
        + b"GIMP"
        + struct.pack(">I", 10)
        + b"brush\x00"
        + b"\x80" * (16 * 12),
        "IMT": b"width 16\x0cheight 12\x0cpixel n8\x0c\x0c" + b"\x40" * (16 * 12),
        "IPTC": iptc(saved("PNG")),
        "MCIDAS": struct.pack(">256i", *([0, 4] + [0] * 6 + [12, 16, 1] + [0] * 3 + [0] * 242)) + b"\x00" * (16 * 12),
        "MPEG": b"\x00\x00\x01\xb3" + bytes((0x01, 0x00, 0xC0, 0x13)) + b"\x00" * 60,
        "PCD": b"\x00" * 2048 + b"PCD_IPI" + b"\x00" * (0x1000 - 7),
        "PIXAR": b"\x80\xe8\x00\x00"
        + b"\x00" * 412
        + struct.pack("<HH", 12, 16)
        + b"\x00" * 4
        + struct.pack("<H", 32)
        + b"\x00" * 90
        + b"\x00" * (16 * 12 * 3),
        "PSD": b"8BPS"
        + struct.pack(">H6xHIIHH", 1, 3, 12, 16, 8, 3)
        + struct.pack(">III", 0, 0, 0)
        + struct.pack(">H", 0)
        + b"\x00" * (16 * 12 * 3),
        "SUN": struct.pack(">8I", 0x59A66A95, 16, 12, 24, 16 * 12 * 3, 1, 0, 0) + b"\x00" * (16 * 12 * 3),
        "WMF": struct.pack("<IHhhhhHI", 0x9AC6CDD7, 0, 0, 0, 160, 120, 1440, 0)
        + struct.pack("<H", 0)
        + b"\x01\x00\x09\x00\x00\x03"
        + b"\x00" * 12,
        "XPM": b'/* XPM */\nstatic char *x[] = {\n"2 1 1 1",\n"a c #ff0000",\n"aa"\n};\n',
        "XVTHUMB": b"P7 332\n#XVVERSION:Version 2.28  Rev: 9/26/92\n#END_OF_COMMENTS\n2 1 255\n\x00\x00",
        "MSP": saved("MSP", "1"),
        "XBM": saved("XBM", "1"),
        "BLP": saved("BLP", "P"),
    }


#: Pillow's open plugins, except the allowed ones, each with a crafted file.
SAVABLE = ["AVIF", "DDS", "DIB", "EPS", "ICNS", "ICO", "IM", "JPEG2000", "PCX", "PPM", "QOI", "SGI", "SPIDER", "TGA"]


def crafted() -> dict[str, bytes]:
    files = {fmt: saved(fmt) for fmt in SAVABLE}
    files["QOI"] = saved("QOI", size=(1500, 1000))  # Pillow decodes QOI in Python, at about 1 s per MB
    files.update(handmade())
    return files


FILES = crafted()
#: Formats whose crafted header Pillow itself cannot read back (a missing handler, a field it rejects):
#: still refused by load_image, just not shown to be "real" by Pillow first.
NOT_IDENTIFIED = {"FLI", "FTEX", "GRIB", "IMT", "PIXAR"}


def test_every_pillow_format_has_a_case() -> None:
    Image.init()
    assert set(Image.ID) - set(ALLOWED_FORMATS) <= set(FILES), sorted(set(Image.ID) - set(ALLOWED_FORMATS) - set(FILES))


@pytest.mark.parametrize("fmt", sorted(FILES))
def test_other_formats_are_refused_by_the_loader(fmt: str) -> None:
    data = FILES[fmt]
    if fmt not in NOT_IDENTIFIED:
        with Image.open(io.BytesIO(data)) as img:  # unrestricted Pillow: the file is what it claims
            assert img.format.upper() == fmt
    t0 = time.perf_counter()
    with pytest.raises(ImageError) as exc:
        load_image(data)
    assert exc.value.code == "undecodable" and time.perf_counter() - t0 < 1
    assert "not a JPEG, PNG, GIF, WebP, BMP or TIFF image" in str(exc.value)  # says what to send instead


# ---------------------------------------------------------------- IPTC wrapping
WRAPPED = {
    "iptc-eps": lambda: iptc(EPS),
    "iptc-png-8000x8000-rgba": lambda: iptc(rgba_png_zeros(8000)),
    "iptc-nested-1500": nested_iptc,
}


@pytest.fixture(scope="module")
def app(tiny_checkpoint: Path):
    model = Captioner.load(tiny_checkpoint, device="cpu")
    application = create_app(
        {
            "CAPTIONER_MODEL": str(tiny_checkpoint),
            "CAPTIONER_INSTANCE": model,
            "TESTING": True,
            "CAPTIONER_LOAD_IN_BACKGROUND": False,
            "CAPTIONER_BATCH_WAIT_MS": 0,
        }
    )
    yield application
    application.extensions[EXTENSION_KEY].close()


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_iptc_wrapping_smuggles_nothing(name: str, app, fake_gs: Path, tmp_path: Path, capsys) -> None:
    """IPTC reopens its inner data with every plugin; it is not opened at all, by the service or the CLI."""
    data = WRAPPED[name]()
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "IPTC" and img.size == (1, 1)
    t0 = time.perf_counter()
    r = app.test_client().post("/v1/captions", data=data, content_type="application/octet-stream")
    assert time.perf_counter() - t0 < 3
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "undecodable", r.get_json()
    assert "/" not in r.get_json()["error"]["message"]  # no server path in the message
    path = tmp_path / "wrapped.jpg"
    path.write_bytes(data)
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "caption",
                str(path),
                "--checkpoint",
                str(app.extensions[EXTENSION_KEY].settings.model_path),
                "--workers",
                "0",
                "-q",
                "-o",
                str(out),
            ]
        )
        == 1
    )
    assert json.loads(out.read_text())["error_code"] == "undecodable"
    assert not fake_gs.exists(), "Ghostscript ran"
    assert app.test_client().get("/readyz").status_code == 200


@pytest.mark.parametrize("fmt", sorted(FILES))
def test_service_answers_every_other_format_quickly(fmt: str, app, fake_gs: Path) -> None:
    t0 = time.perf_counter()
    r = app.test_client().post("/v1/captions", data=FILES[fmt], content_type="application/octet-stream")
    assert time.perf_counter() - t0 < 3
    error = r.get_json()["error"]
    assert r.status_code == 400 and error == {
        "code": "undecodable",
        "request_id": r.headers["X-Request-ID"],
        "message": "not a JPEG, PNG, GIF, WebP, BMP or TIFF image (no other format is accepted)",
    }
    assert not fake_gs.exists()
    assert app.test_client().get("/readyz").status_code == 200


# ---------------------------------------------------------------- bounded decode cost
@functools.cache
def many_scan_jpeg(side: int = 3000, copies: int = 1500) -> bytes:
    """A progressive JPEG whose last scan is repeated: every scan is a pass over all coefficients, so the
    decode time grows with the (cheap) scans, not with the pixels (0.33 MB took 34 s at 7000x7000). 1500 copies
    take ~9 s here, far beyond the 2.5 s limit on any machine (300 took 2.5 s: a coin toss)."""
    data = image_bytes(make_image(2, (side, side)), "JPEG", progressive=True, quality=30)
    sos = data.rfind(b"\xff\xda")
    return data[:-2] + data[sos:-2] * copies + b"\xff\xd9"


def test_a_decode_that_runs_too_long_is_killed() -> None:
    pool = DecodePool(1, timeout_s=0.5, memory_mb=1024).start()
    data = many_scan_jpeg()
    try:
        t0 = time.perf_counter()
        with pytest.raises(ImageError) as exc:
            pool.decode(data, 64, thumbnail_side=320, draft_size=320)
        assert exc.value.code == "too_slow" and time.perf_counter() - t0 < 3
        assert pool.restarts == 1
        assert pool.decode(image_bytes(make_image(3)), 64).image.size == (64, 64)  # the new worker works
    finally:
        pool.close()


def test_a_decode_that_needs_too_much_memory_is_refused() -> None:
    """A 7000x7000 RGBA PNG needs ~560 MB to decode; with a 200 MB cap it is refused, not decoded."""
    pool = DecodePool(1, timeout_s=30, memory_mb=200).start()
    try:
        with pytest.raises(ImageError) as exc:
            pool.decode(rgba_png_zeros(7000), 64)
        assert exc.value.code == "too_large"
        assert pool.decode(image_bytes(make_image(4)), 64).image.size == (64, 64)
    finally:
        pool.close()


def test_decode_slots_are_first_come_first_served_until_the_deadline() -> None:
    import threading

    pool = DecodePool(1, timeout_s=3, memory_mb=1024).start()
    slow = many_scan_jpeg()
    order: list[int] = []

    def hold() -> None:
        with pytest.raises(ImageError):  # killed after 3 s: the one slot is busy until then
            pool.decode(slow, 32, draft_size=320)

    try:
        first = threading.Thread(target=hold)
        first.start()
        time.sleep(0.3)

        def waiter(i: int) -> None:
            pool.decode(image_bytes(make_image(i)), 32, deadline=time.monotonic() + 30)
            order.append(i)

        waiters = []
        for i in range(4):
            waiters.append(threading.Thread(target=waiter, args=(i,)))
            waiters[-1].start()
            time.sleep(0.05)
        with pytest.raises(PoolBusy):  # a caller whose deadline passes before a slot frees up
            pool.decode(image_bytes(make_image(9)), 32, deadline=time.monotonic() + 0.1)
        for t in [first, *waiters]:
            t.join(60)
        assert order == [0, 1, 2, 3] and pool.restarts == 1
        assert pool.waiting == 0 and pool.peak_busy == 1
    finally:
        pool.close()
