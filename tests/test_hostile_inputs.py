"""Hostile and odd input: a generated corpus through the service (Flask test client) and the batch CLI.

Every case gets a caption or its documented JSON error (never a 5xx), the service stays ready, memory
stays bounded (peak RSS measured in a subprocess), uploads never touch the file system, pickled
"checkpoints" are refused without running their payload, and attention file names cannot escape.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.api import MAX_BEAM_SIZE, MAX_LENGTH_LIMIT, Captioner
from captioner.commands.main import main
from captioner.images import DEFAULT_MAX_PIXELS
from service.app import EXTENSION_KEY, create_app

from conftest import assert_scored_by_the_model, image_bytes, make_image

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20


# ---------------------------------------------------------------- builders (all generated, nothing from disk)
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB pixels, with almost no pixel data (a bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


@functools.cache
def solid_png(width: int, height: int, grey: int = 128) -> bytes:
    """A real, complete single-colour 8-bit grey PNG, streamed through zlib (never held as pixels)."""
    comp = zlib.compressobj(1)
    row = b"\x00" + bytes([grey]) * width
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@functools.cache
def solid_jpeg(width: int, height: int) -> bytes:
    return image_bytes(Image.new("L", (width, height), 128), "JPEG", quality=50)


def jpeg_with_sof_size(width: int, height: int) -> bytes:
    """A small JPEG whose frame header is patched to claim width x height."""
    data = bytearray(jpeg())
    at = data.find(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_header_only(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x4c\x01\x00"
    return b"GIF89a" + screen + image + b"\x3b"


def tiff_header_only(width: int, height: int) -> bytes:
    """A little-endian TIFF whose IFD claims width x height 8-bit grey pixels in one strip of 16 bytes."""
    tags = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 0),
        (277, 3, 1),
        (278, 4, height),
        (279, 4, 16),
    ]
    ifd_size = 2 + 12 * len(tags) + 4
    data_at = 8 + ifd_size
    entries = b"".join(
        struct.pack("<HHII", tag, kind, 1, data_at if tag == 273 else value) for tag, kind, value in tags
    )
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + entries + b"\x00" * 4 + b"\x00" * 16


def jpeg(seed: int = 1, size: tuple[int, int] = (96, 72)) -> bytes:
    return image_bytes(make_image(seed, size))


def png_bytes(img: Image.Image, **kwargs) -> bytes:
    return image_bytes(img, "PNG", **kwargs)


def sixteen_bit() -> bytes:
    arr = np.linspace(0, 65535, 80 * 60, dtype=np.uint16).reshape(60, 80)
    return png_bytes(Image.fromarray(arr))  # mode I;16


def palette_with_transparency() -> bytes:
    img = make_image(4, (80, 60)).convert("P")
    return png_bytes(img, transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def truncated_animation() -> bytes:
    """An animated GIF cut right after the second frame's extension introducer (found by fuzzing:
    Pillow's ``is_animated`` raised IndexError, which escaped as a 500)."""
    data = animated_gif()
    second = data.index(b"\x21\xf9", data.index(b"\x2c"))
    return data[: second + 1]


def exif_rotated(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes(make_image(6, (90, 60)), "JPEG", exif=exif.tobytes())


def corrupt_exif() -> bytes:
    """A valid JPEG with an APP1 Exif segment full of garbage (a broken IFD)."""
    good = jpeg(2)
    app1 = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08" + b"\xff" * 40
    return good[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + good[2:]


def png_text_bomb() -> bytes:
    """A valid PNG carrying a zTXt chunk that inflates to 50 MB."""
    good = png_bytes(make_image(3))
    ztxt = png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"A" * 50_000_000, 9))
    return good[:33] + ztxt + good[33:]


def png_bad_crc() -> bytes:
    data = bytearray(png_bytes(make_image(3)))
    data[29] ^= 0xFF  # inside IHDR's CRC
    return bytes(data)


def float_tiff_nan() -> bytes:
    arr = np.full((30, 40), np.nan, dtype=np.float32)
    arr[0, 0], arr[1, 1] = np.inf, -np.inf
    return image_bytes(Image.fromarray(arr, "F"), "TIFF")


def cut_in_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def zip_file() -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("photo.jpg", jpeg())
    return buf.getvalue()


# ---------------------------------------------------------------- the corpus
@dataclass(frozen=True)
class Case:
    """One hostile input. ``build`` None = no image at all (service: no file field; CLI: a missing path).

    ``status``/``code``: the service's answer (``code`` None for 200). ``cli``: the batch CLI's outcome,
    ``"caption"``, an ``error_code``, ``"usage"`` (exit 2) or None (no CLI equivalent).
    """

    name: str
    build: Callable[[], bytes] | None
    status: int
    code: str | None
    cli: str | None = "caption"
    filename: str = "upload.jpg"
    content_type: str = "image/jpeg"
    query: str = ""
    cli_args: tuple[str, ...] = ()
    size: tuple[int, int] | None = None  # image.width/height expected in a 200


OK, BAD, BIG = (200, None), (400, "undecodable"), (413, "too_large")
CASES = [
    Case("zero-bytes", lambda: b"", 400, "missing_image", "undecodable"),
    Case("truncated-jpeg", lambda: cut_in_half(jpeg(7, (160, 120))), *BAD, "undecodable"),
    Case("jpeg-soi-only", lambda: b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", *BAD, "undecodable"),
    Case(
        "truncated-png",
        lambda: cut_in_half(png_bytes(make_image(8, (160, 120)))),
        *BAD,
        "undecodable",
        filename="cut.png",
        content_type="image/png",
    ),
    Case("png-bad-crc", png_bad_crc, *BAD, "undecodable", filename="crc.png", content_type="image/png"),
    Case("random-1k", lambda: random_bytes(1024), *BAD, "undecodable"),
    Case(
        "random-256k", lambda: random_bytes(256 * 1024, 1), *BAD, "undecodable", content_type="application/octet-stream"
    ),
    Case("text-as-jpeg", lambda: b"just some text\n" * 20, *BAD, "undecodable"),
    Case(
        "html-as-png",
        lambda: b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
        *BAD,
        "undecodable",
        filename="page.png",
        content_type="image/png",
    ),
    Case(
        "svg",
        lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="4000" height="4000"><rect/></svg>',
        *BAD,
        "undecodable",
        filename="vector.svg",
        content_type="image/svg+xml",
    ),
    Case("pdf-as-jpeg", lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", *BAD, "undecodable"),
    Case("zip-as-jpeg", zip_file, *BAD, "undecodable"),
    Case(
        "eps-never-run",
        lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        *BAD,
        "undecodable",
        filename="x.eps",
        content_type="image/eps",
    ),
    Case("png-named-jpg", lambda: png_bytes(make_image(9)), *OK, size=(96, 72)),
    Case("jpeg-named-png", lambda: jpeg(10), *OK, filename="photo.png", content_type="image/png", size=(96, 72)),
    Case(
        "gif-named-txt",
        lambda: image_bytes(make_image(11), "GIF"),
        *OK,
        filename="notes.txt",
        content_type="application/octet-stream",
        size=(96, 72),
    ),
    Case(
        "bomb-png-30000x30000",
        lambda: png_header_only(30000, 30000),
        *BIG,
        "too_large",
        filename="bomb.png",
        content_type="image/png",
    ),
    Case(
        "bomb-png-9000x9000",
        lambda: png_header_only(9000, 9000),
        *BIG,
        "too_large",
        filename="bomb.png",
        content_type="image/png",
    ),
    Case("bomb-jpeg-65000x65000", lambda: jpeg_with_sof_size(65000, 65000), *BIG, "too_large"),
    Case(
        "bomb-gif-65535x65535",
        lambda: gif_header_only(65535, 65535),
        *BIG,
        "too_large",
        filename="bomb.gif",
        content_type="image/gif",
    ),
    Case(
        "bomb-tiff-60000x60000",
        lambda: tiff_header_only(60000, 60000),
        *BIG,
        "too_large",
        filename="bomb.tif",
        content_type="image/tiff",
    ),
    Case(
        "real-12000x12000-png",
        lambda: solid_png(12000, 12000),
        *BIG,
        "too_large",
        filename="huge.png",
        content_type="image/png",
    ),
    Case("real-7000x7000-jpeg-under-limit", lambda: solid_jpeg(7000, 7000), *OK, size=(7000, 7000)),
    Case("png-ztxt-bomb", png_text_bomb, *BAD, "undecodable", filename="text.png", content_type="image/png"),
    Case(
        "1x1",
        lambda: png_bytes(Image.new("RGB", (1, 1), (200, 10, 10))),
        *OK,
        filename="dot.png",
        content_type="image/png",
        size=(1, 1),
    ),
    Case(
        "5000x3",
        lambda: png_bytes(make_image(12, (5000, 3))),
        *OK,
        filename="wide.png",
        content_type="image/png",
        size=(5000, 3),
    ),
    Case(
        "3x5000-overlay",
        lambda: png_bytes(make_image(13, (3, 5000))),
        *OK,
        filename="tall.png",
        content_type="image/png",
        query="attention=overlay",
        size=(3, 5000),
    ),
    Case("cmyk-jpeg", lambda: image_bytes(make_image(14).convert("CMYK"), "JPEG"), *OK, size=(96, 72)),
    Case(
        "grey-alpha-png",
        lambda: png_bytes(make_image(15).convert("LA")),
        *OK,
        filename="la.png",
        content_type="image/png",
        size=(96, 72),
    ),
    Case(
        "palette-transparent-png",
        palette_with_transparency,
        *OK,
        filename="p.png",
        content_type="image/png",
        size=(80, 60),
    ),
    Case("16-bit-png", sixteen_bit, *OK, filename="deep.png", content_type="image/png", size=(80, 60)),
    Case("float-tiff-nan-inf", float_tiff_nan, *OK, filename="f.tif", content_type="image/tiff", size=(40, 30)),
    Case("animated-gif", animated_gif, *OK, filename="anim.gif", content_type="image/gif", size=(40, 30)),
    # Cut after its first frame: that frame is complete and is the only one decoded (the rest is never read).
    Case(
        "truncated-animated-gif", truncated_animation, *OK, filename="cut.gif", content_type="image/gif", size=(40, 30)
    ),
    Case(
        "webp",
        lambda: image_bytes(make_image(16), "WEBP"),
        *OK,
        filename="x.webp",
        content_type="image/webp",
        size=(96, 72),
    ),
    Case(
        "bmp",
        lambda: image_bytes(make_image(17), "BMP"),
        *OK,
        filename="x.bmp",
        content_type="image/bmp",
        size=(96, 72),
    ),
    Case(
        "tiff-lzw",
        lambda: image_bytes(make_image(18), "TIFF", compression="tiff_lzw"),
        *OK,
        filename="x.tiff",
        content_type="image/tiff",
        size=(96, 72),
    ),
    Case("exif-rotated", exif_rotated, *OK, size=(90, 60)),
    Case("exif-orientation-9", lambda: exif_rotated(9), *OK, size=(90, 60)),
    Case("exif-garbage", corrupt_exif, *OK, size=(96, 72)),
    Case("trailing-junk-after-jpeg", lambda: jpeg(19) + random_bytes(4096, 2), *OK, size=(96, 72)),
    Case("above-upload-limit", lambda: jpeg(20) + b"\x00" * (21 * MiB), 413, "payload_too_large", "caption"),
    Case("missing-image", None, 400, "missing_image", "not_found"),
    Case("beam_size=0", jpeg, 400, "invalid_parameter", "usage", query="beam_size=0", cli_args=("--beam-size", "0")),
    Case("beam_size=11", jpeg, 400, "invalid_parameter", "usage", query="beam_size=11", cli_args=("--beam-size", "11")),
    Case(
        "beam_size=abc", jpeg, 400, "invalid_parameter", "usage", query="beam_size=abc", cli_args=("--beam-size", "abc")
    ),
    Case(
        "beam_size=huge",
        jpeg,
        400,
        "invalid_parameter",
        "usage",
        query="beam_size=" + "9" * 40,
        cli_args=("--beam-size", "9" * 40),
    ),
    Case("n_best=0", jpeg, 400, "invalid_parameter", "usage", query="n_best=0", cli_args=("--n-best", "0")),
    Case("n_best=11", jpeg, 400, "invalid_parameter", "usage", query="n_best=11", cli_args=("--n-best", "11")),
    Case(
        "n_best>beam_size",
        jpeg,
        *OK,
        query="n_best=10&beam_size=2",
        cli_args=("--n-best", "10", "--beam-size", "2"),
        size=(96, 72),
    ),
    Case("max_length=0", jpeg, 400, "invalid_parameter", "usage", query="max_length=0", cli_args=("--max-length", "0")),
    Case(
        "max_length=61", jpeg, 400, "invalid_parameter", "usage", query="max_length=61", cli_args=("--max-length", "61")
    ),
    Case(
        "max_length=-1", jpeg, 400, "invalid_parameter", "usage", query="max_length=-1", cli_args=("--max-length=-1",)
    ),
    Case("attention=bogus", jpeg, 400, "invalid_parameter", None, query="attention=bogus"),
    Case("attention=../../etc", jpeg, 400, "invalid_parameter", None, query="attention=../../etc/passwd"),
]
IDS = [c.name for c in CASES]
assert len(CASES) >= 30 and len(set(IDS)) == len(IDS)


# ---------------------------------------------------------------- the service
@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Captioner:
    return Captioner.load(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def app(tiny_checkpoint: Path, model: Captioner):
    """The service with its documented default limits (20 MiB, 50 M pixels)."""
    application = create_app(
        {
            "CAPTIONER_MODEL": str(tiny_checkpoint),
            "CAPTIONER_INSTANCE": model,
            "CAPTIONER_LOAD_IN_BACKGROUND": False,
            "CAPTIONER_BATCH_WAIT_MS": 0,
            "TESTING": True,
        }
    )
    yield application
    application.extensions[EXTENSION_KEY].close()


def check_answer(response, case: Case) -> dict:
    """The documented answer: a caption, or ``{"error": {"code", "message"}}``, never a 5xx."""
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert response.status_code == case.status, body
    if case.code is None:
        assert isinstance(body["caption"], str) and body["tokens"]
        if case.size:
            assert (body["image"]["width"], body["image"]["height"]) == case.size
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}, body
        assert body["error"]["code"] == case.code, body
        assert body["error"]["message"] and "object at 0x" not in body["error"]["message"]
    return body


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_service_multipart(app, case: Case) -> None:
    client = app.test_client()
    form: dict = {"beam_size": "2"} if case.build is None else {}
    if case.build is not None:
        form["image"] = (io.BytesIO(case.build()), case.filename, case.content_type)
    check_answer(client.post(f"/v1/captions?{case.query}", data=form, content_type="multipart/form-data"), case)
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_service_raw_body(app, case: Case) -> None:
    client = app.test_client()
    data = b"" if case.build is None else case.build()
    check_answer(client.post(f"/v1/captions?{case.query}", data=data, content_type=case.content_type), case)
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    "extra", [{"note": "x" * 600_000}, {f"f{i}": "1" for i in range(1500)}], ids=["text-field-600kB", "1500-form-parts"]
)
def test_service_form_limits(app, extra: dict[str, str]) -> None:
    """Werkzeug's form limits (text fields <= 500 kB, <= 1000 parts) answer 413 with a message that says
    which limit, not the body-size one (the body is far below 20 MiB)."""
    form = {"image": (io.BytesIO(jpeg()), "a.jpg", "image/jpeg"), **extra}
    r = app.test_client().post("/v1/captions", data=form, content_type="multipart/form-data")
    assert r.status_code == 413
    error = r.get_json()["error"]
    assert error["code"] == "payload_too_large" and "form" in error["message"] and "MiB" not in error["message"]


def test_service_is_healthy_after_the_corpus(app, model: Captioner) -> None:
    """After every hostile case: ready, no 5xx ever counted, and still captions like the library."""
    client = app.test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["status"] == "ready"
    metrics = client.get("/metrics").get_data(as_text=True)
    statuses = re.findall(r'captioner_http_requests_total\{[^}]*status="(\d+)"[^}]*\} (\S+)', metrics)
    assert statuses and not [s for s, n in statuses if s.startswith("5") and float(n) > 0], statuses
    body = client.post("/v1/captions", data=jpeg(3), content_type="image/jpeg").get_json()
    assert body["caption"] == model.caption(jpeg(3), beam_size=3).text
    assert_scored_by_the_model(
        model,
        jpeg(3),
        [t["word"] for t in body["tokens"]],
        [t["logprob"] for t in body["tokens"]],
        body["score"],
        body["parameters"]["max_length"],
    )


# ---------------------------------------------------------------- the batch CLI, in-process


@pytest.mark.parametrize("case", [c for c in CASES if c.cli], ids=[c.name for c in CASES if c.cli])
def test_batch_cli(case: Case, tiny_checkpoint: Path, tmp_path: Path, load_once: None, capsys) -> None:
    path = tmp_path / case.filename
    if case.build is not None:
        path.write_bytes(case.build())
    out = tmp_path / "out.jsonl"
    argv = [
        "caption",
        str(path),
        "--checkpoint",
        str(tiny_checkpoint),
        "--workers",
        "0",
        "-q",
        "-o",
        str(out),
        *case.cli_args,
    ]
    if case.cli == "usage":
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and "usage:" in capsys.readouterr().err
        return
    code = main(argv)
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["image"] == str(path)
    if case.cli == "caption":
        assert code == 0 and isinstance(record["caption"], str) and "error" not in record, record
    else:
        assert code == 1 and record["error_code"] == case.cli and "caption" not in record, record
        assert str(path) in capsys.readouterr().err


# ---------------------------------------------------------------- bounded memory
MEMORY_PROBE = r"""
import ctypes, gc, json, sys
import torch  # preprocess imports it on first use; loaded here so that no file's growth counts torch itself
from captioner.images import load_image, preprocess, ImageError
libc = ctypes.CDLL("libc.so.6")
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
out = {}
for arg in sys.argv[1:]:
    path, draft = arg.rsplit(":", 1)
    data = open(path, "rb").read()
    gc.collect()
    libc.malloc_trim(0)  # hand freed memory back, so that the next file's growth is its own
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = status_mb("VmRSS")
    try:
        img = load_image(data, draft_size=int(draft) or None)
        preprocess(img, 260)
        result = "decoded %dx%d" % img.size
        del img
    except ImageError as exc:
        result = exc.code
    out[path.rsplit("/", 1)[-1] + ("" if int(draft) else " (no draft)")] = {
        "result": result, "peak_growth_mb": round(status_mb("VmHWM") - before, 1)}
    del data
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_bombs_never_allocate_their_claimed_size(tmp_path: Path) -> None:
    """Peak RSS growth (VmHWM reset before each file, in a fresh subprocess) while decoding + preprocessing.

    The last two rows are controls showing the probe sees real decoding: the same 7000x7000 JPEG
    without DCT scaling, and a 7000x7000 PNG (49 M pixels, just under the limit, decoded in full)."""
    files = {  # name: (bytes, draft size or 0, expected result, (min, max) growth in MB)
        "header-30000x30000.png": (png_header_only(30000, 30000), 260, "too_large", (0, 20)),
        "jpeg-sof-65000x65000.jpg": (jpeg_with_sof_size(65000, 65000), 260, "too_large", (0, 20)),
        "real-12000x12000.png": (solid_png(12000, 12000), 260, "too_large", (0, 20)),
        "real-7000x7000.jpg": (solid_jpeg(7000, 7000), 260, "decoded 875x875", (0, 40)),
        "real-7000x7000.jpg (no draft)": (solid_jpeg(7000, 7000), 0, "decoded 7000x7000", (100, 1000)),
        "real-7000x7000.png": (solid_png(7000, 7000), 260, "decoded 7000x7000", (100, 1000)),
    }
    args = []
    for name, (data, draft, _, _) in files.items():
        path = tmp_path / name.split(" ")[0]
        path.write_bytes(data)
        args.append(f"{path}:{draft}")
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    print(json.dumps(report, indent=1))  # figures for docs/reliability.md (pytest -s)
    for name, (_, _, expected, (low, high)) in files.items():
        assert report[name]["result"] == expected
        # Claimed RGB sizes: 2.7 GB, 12.7 GB, 432 MB, 147 MB: bombs never get near theirs.
        assert low <= report[name]["peak_growth_mb"] < high, (name, report[name])


def test_concurrent_decodes_are_bounded(tiny_checkpoint: Path, model: Captioner) -> None:
    """However many request threads, at most CAPTIONER_DECODE_SLOTS uploads are decoded at once per worker
    (each in its own capped decode process), and every request still gets its caption."""
    application = create_app(
        {
            "CAPTIONER_MODEL": str(tiny_checkpoint),
            "CAPTIONER_INSTANCE": model,
            "CAPTIONER_LOAD_IN_BACKGROUND": False,
            "CAPTIONER_WARMUP": False,
            "TESTING": True,
            "CAPTIONER_DECODE_SLOTS": 2,
        }
    )
    pool = application.extensions[EXTENSION_KEY].decoder
    n = 3 * pool.size
    barrier, statuses = threading.Barrier(n), []
    big = solid_jpeg(2000, 1500)  # large enough that decodes overlap

    def post(i: int) -> None:
        client = application.test_client()
        barrier.wait()
        statuses.append(client.post("/v1/captions?attention=overlay", data=big, content_type="image/jpeg").status_code)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        application.extensions[EXTENSION_KEY].close()
    assert statuses == [200] * n
    assert pool.size == 2 and 1 <= pool.peak_busy <= pool.size


# ---------------------------------------------------------------- security: uploads never touch the disk
_WATCH = threading.Event()
_EVENTS: list[tuple[str, tuple]] = []
_FS_EVENTS = {
    "open",
    "os.rename",
    "os.replace",
    "os.remove",
    "os.unlink",
    "os.mkdir",
    "os.rmdir",
    "os.link",
    "os.symlink",
    "os.truncate",
    "os.chmod",
    "os.chown",
    "shutil.copyfile",
    "shutil.move",
    "tempfile.mkstemp",
    "tempfile.mkdtemp",
    "subprocess.Popen",
    "os.system",
    "os.exec",
    "os.posix_spawn",
}


def _audit(event: str, args: tuple) -> None:
    if _WATCH.is_set() and event in _FS_EVENTS:
        _EVENTS.append((event, args))


@functools.cache
def _install_audit_hook() -> None:
    """Add :func:`_audit` once: hooks cannot be removed; it records only while ``_WATCH`` is set."""
    sys.addaudithook(_audit)


def _writes(events: list[tuple[str, tuple]]) -> list:
    bad = []
    for event, args in events:
        if event != "open":
            bad.append((event, args))
            continue
        _, mode, flags = (*tuple(args), None, None, None)[:3]
        writing = bool(mode and set(str(mode)) & set("wax+")) or bool(
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        )
        if writing:
            bad.append((event, args))
    return bad


@pytest.mark.parametrize(
    "filename",
    [
        "../../etc/passwd",
        "/etc/shadow",
        "..\\..\\windows\\win.ini",
        "%2e%2e%2f%2e%2e%2ftmp%2fpwn.jpg",
        "a\x00b.jpg",
        "x" * 5000 + ".jpg",
    ],
)
def test_upload_file_names_and_bytes_never_reach_the_file_system(app, filename: str) -> None:
    """A Python audit hook records every open/rename/remove/exec while the request runs: no write at all,
    nothing named after the upload, no program started. (Large uploads too: above Werkzeug's
    500 kB spooling threshold.)"""
    _install_audit_hook()
    noise = np.random.default_rng(1).integers(0, 256, (420, 420, 3), dtype=np.uint8)
    big = png_bytes(Image.fromarray(noise))
    assert len(big) > 500_000
    # The body is encoded here: Werkzeug's test client would itself spool a large form to a temporary file.
    boundary = "hostile-boundary-7f3a"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode("utf-8", "surrogateescape")
        + big
        + f"\r\n--{boundary}--\r\n".encode()
    )
    client = app.test_client()
    _EVENTS.clear()
    _WATCH.set()
    try:
        r = client.post(
            "/v1/captions?attention=overlay", data=body, content_type=f"multipart/form-data; boundary={boundary}"
        )
    finally:
        _WATCH.clear()
    assert r.status_code == 200, r.get_data(as_text=True)[:300]
    assert not _writes(_EVENTS), _writes(_EVENTS)
    touched = [str(args[0]) for event, args in _EVENTS if args]
    assert not [p for p in touched if re.search(r"passwd|shadow|win\.ini|pwn|xxxxxxxx", p)], touched


def test_eps_is_never_handed_to_ghostscript(app, fake_gs: Path) -> None:
    """Pillow renders EPS by running ``gs`` on a temporary copy of the upload; EPS is not opened at all."""
    marker = fake_gs
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    r = app.test_client().post("/v1/captions", data=eps, content_type="application/octet-stream")
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "undecodable"
    assert not marker.exists()


# ---------------------------------------------------------------- security: pickled "checkpoints"
class _Payload:
    """Unpickling this creates ``marker`` (what an attacker's pickle would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def evil(tmp_path: Path, tiny_checkpoint: Path) -> tuple[list[Path], Path]:
    """Pickles offered as a model: a .pt (torch.save zip), a raw pickle .bin, and a real checkpoint folder whose
    model.safetensors is a pickle. The payload is live: plain unpickling creates the marker."""
    marker = tmp_path / "payload-ran"
    pt = tmp_path / "model.pt"
    torch.save({"state_dict": _Payload(marker)}, pt)
    raw = tmp_path / "pytorch_model.bin"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    pickle.loads(raw.read_bytes()).close()
    assert marker.exists()
    marker.unlink()
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("config.json", "vocab.json"):
        shutil.copy(tiny_checkpoint / name, folder / name)
    (folder / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    return [pt, raw, folder], marker


def test_pickled_model_is_refused_by_the_service(evil, monkeypatch: pytest.MonkeyPatch) -> None:
    paths, marker = evil
    for path in paths:
        monkeypatch.setenv("CAPTIONER_MODEL", str(path))
        app = create_app({"CAPTIONER_LOAD_IN_BACKGROUND": True, "CAPTIONER_WARMUP": False})
        try:
            assert not app.extensions[EXTENSION_KEY].wait_ready(60)
            r = app.test_client().get("/readyz")
            assert r.status_code == 503
            body = r.get_json()
            assert body["status"] == "failed" and "CheckpointError" in body["error"]["message"], body
            if path.suffix in (".pt", ".bin"):
                assert "pickle" in body["error"]["message"]
            caption = app.test_client().post("/v1/captions", data=jpeg(), content_type="image/jpeg")
            assert caption.status_code == 503 and caption.get_json()["error"]["code"] == "not_ready"
        finally:
            app.extensions[EXTENSION_KEY].close()
    assert not marker.exists(), "the pickle's payload ran"


def test_pickled_model_is_refused_by_the_cli(evil, images_dir: Path, tmp_path: Path, capsys) -> None:
    paths, marker = evil
    for path in paths:
        assert main(["caption", str(images_dir), "--checkpoint", str(path), "--workers", "0", "-q"]) == 2
        err = capsys.readouterr().err
        assert "error" in err and str(path) in err
        if path.suffix in (".pt", ".bin"):
            assert "pickle" in err
    assert main(["evaluate", "--checkpoint", str(paths[0]), "--data-dir", str(tmp_path), "--no-meteor"]) == 2
    assert "pickle" in capsys.readouterr().err
    assert not marker.exists(), "the pickle's payload ran"


@pytest.mark.parametrize(
    "broken",
    [
        "vocab.json={}",
        "vocab.json=not json",
        "config.json=[1, 2]",
        'config.json={"format_version": 1}',
        "model.safetensors=\x00\x01",
    ],
)
def test_malformed_checkpoint_is_a_clear_error(
    broken: str, tiny_checkpoint: Path, images_dir: Path, tmp_path: Path, capsys
) -> None:
    name, content = broken.split("=", 1)
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / name).write_text(content)
    assert main(["caption", str(images_dir), "--checkpoint", str(folder), "--workers", "0", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("captioner caption: error: ") and str(folder) in err and "Traceback" not in err


# ---------------------------------------------------------------- CLI: attention file names
def test_attention_dir_names_are_sanitised(tiny_checkpoint: Path, tmp_path: Path, load_once: None) -> None:
    src = tmp_path / "in"
    src.mkdir()
    names = [
        "a b;rm -rf ~.jpg",
        "$(touch pwn).jpg",
        "名前 ünïcödé.jpg",
        "-rf.jpg",
        "line\nbreak.jpg",
        "..jpg",
        ".hidden.jpg",
        "x" * 200 + ".jpg",
    ]
    for i, name in enumerate(names):
        (src / name).write_bytes(jpeg(30 + i))
    (src / "deep").mkdir()
    inputs = [str(src / n) for n in names] + [str(src / "deep" / ".." / ".." / "in" / names[0])]
    att = tmp_path / "att"
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "caption",
                *inputs,
                "--checkpoint",
                str(tiny_checkpoint),
                "--workers",
                "0",
                "-q",
                "-o",
                str(out),
                "--attention-dir",
                str(att),
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(names)  # the '..' spelling of names[0] is the same file: captioned once
    for f in att.rglob("*"):
        rel = f.relative_to(att)
        assert f.resolve().is_relative_to(att.resolve())
        if f.parent == att:
            assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}-[0-9a-f]{10}(\.npz)?", f.name), rel
        else:
            assert len(rel.parts) == 2 and re.fullmatch(r"\d\d-[A-Za-z0-9_-]+\.png", f.name), rel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["att", "in", "out.jsonl"]  # nothing written elsewhere
    assert not (tmp_path / "pwn").exists() and not Path("pwn").exists()


# ---------------------------------------------------------------- limits are enforced and documented
def test_limits_table_matches_the_code() -> None:
    from service.config import load_settings

    doc = (REPO / "docs" / "reliability.md").read_text()
    s = load_settings({}, {})
    assert s.max_upload_mb == 20 and s.max_pixels == DEFAULT_MAX_PIXELS
    for needle in (
        f"1–{MAX_BEAM_SIZE}",
        f"1–{MAX_LENGTH_LIMIT}",
        f"{DEFAULT_MAX_PIXELS:,}",
        "20 MiB",
        "`CAPTIONER_MAX_UPLOAD_MB`",
        "`CAPTIONER_MAX_PIXELS`",
        "`CAPTIONER_QUEUE_SIZE`",
        "`CAPTIONER_REQUEST_TIMEOUT_S`",
    ):
        assert needle in doc, needle
