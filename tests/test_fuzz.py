"""Fuzzing with hypothesis: the image-decoding path and the upload endpoint.

* ``captioner.images.load_image`` (+ ``preprocess``): for arbitrary bytes, for bytes behind a real
  format's magic number, and for mutated valid images (bit flips, overwritten runs, truncation,
  insertions, header fields), only ``ImageError`` may escape; what decodes is an RGB image.
* ``POST /v1/captions`` (Flask test client): for any body, Content-Type and parameters, the status is
  one of 200/400/413/415/422 with the documented JSON body, and the service stays ready.

Bounded: ``FUZZ_EXAMPLES`` examples per test (default 100; ``FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py``
for a longer campaign), no deadline, no example database (runs are independent; a failure prints the
example to reproduce it with ``@reproduce_failure``).
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as _event
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from PIL import Image

from captioner.api import Captioner
from captioner.images import ImageError, load_image, preprocess
from service.app import EXTENSION_KEY, create_app

from conftest import image_bytes, make_image

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _mpo(img: Image.Image) -> bytes:
    """A two-picture MPO (what phones and 3D cameras write): a JPEG with a multi-picture index."""
    buf = io.BytesIO()
    img.save(buf, format="MPO", save_all=True, append_images=[img.rotate(90)])
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    """Small valid images in every family the decoders handle (the starting points of mutation)."""
    img = make_image(1, (24, 18))
    frames = [Image.new("RGB", (12, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    anim = io.BytesIO()
    frames[0].save(anim, format="GIF", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6
    sixteen = Image.fromarray(np.arange(24 * 18, dtype=np.uint16).reshape(18, 24) * 97)
    return {
        "jpeg": image_bytes(img, "JPEG", quality=80),
        "jpeg-progressive-exif": image_bytes(img, "JPEG", progressive=True, exif=exif.tobytes()),
        "jpeg-cmyk": image_bytes(img.convert("CMYK"), "JPEG"),
        "png": image_bytes(img, "PNG"),
        "png-palette-transparent": image_bytes(img.convert("P"), "PNG", transparency=3),
        "png-la": image_bytes(img.convert("LA"), "PNG"),
        "png-16bit": image_bytes(sixteen, "PNG"),
        "gif-animated": anim.getvalue(),
        "bmp": image_bytes(img, "BMP"),
        "tiff": image_bytes(img, "TIFF"),
        "tiff-lzw": image_bytes(img, "TIFF", compression="tiff_lzw"),
        "webp": image_bytes(img, "WEBP"),
        "mpo": _mpo(img),
    }


SEEDS = _seeds()
MAGICS = [
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"GIF87a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x00\x00\x00WEBP",
    b"\x00\x00\x01\x00",
    b"P6\n",
    b"P5\n",
    b"8BPS",
    b"%!PS-Adobe-3.0 EPSF",
    b"\x00\x00\x00\x0cjP  ",
    b"qoif",
    b"DDS ",
    b"\x0a\x05\x01\x08",
    b"icns",
    b"SIMPLE  =",
]
# The headers of every other format Pillow registers (all refused by the allow-list; IPTC wraps others).
MAGICS += [
    b"\x1c\x03\x3c\x00\x02\x01\x00",
    b"BUFR",
    b"GRIB",
    b"\x89HDF\r\n\x1a\n",
    b"\x00\x00\x02\x00",
    b"\xb1\x68\xde\x3a",
    b"FTEX",
    b"\x00\x00\x01\xb3",
    b"\x80\xe8\x00\x00",
    b"\x59\xa6\x6a\x95",
    b"\xd7\xcd\xc6\x9a",
    b"\x01\x00\x09\x00",
    b"/* XPM */",
    b"P7 332",
    b"DanM",
    b"LinS",
    b"#define",
    b"BLP1",
    b"BLP2",
    b"\x00\x00\x00\x1cftypavif",
    b"Image type:",
    b"\x01\xda",
    b"PCD_IPI",
    b"GIMP",
    b"width ",
    b"\x00\x00\x00\x00\x00\x00\x00\x04",
    b"8BPS\x00\x01",
    b"P7\n",
    b"PF\n",
    b"\x00\x00\x0a\x00",
]


@st.composite
def mutated_image(draw) -> bytes:
    """A valid seed image with 1-4 random mutations."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "delete", "header-int"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
        elif kind == "truncate":
            del data[max(1, at) :]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        else:  # a plausible header field (size, count, offset) set to an extreme value, in either byte order
            at = draw(st.integers(0, min(64, max(0, len(data) - 4))))
            value = draw(st.sampled_from([0, 1, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 30000, 65535 * 2]))
            data[at : at + 4] = struct.pack(draw(st.sampled_from([">I", "<I"])), value)
    return bytes(data)


def event(name: str) -> None:
    """Count an outcome in ``--hypothesis-show-statistics`` (a no-op outside a hypothesis test)."""
    with contextlib.suppress(InvalidArgument):
        _event(name)


def check_decoding(data: bytes) -> None:
    """Only ImageError may escape; success means an RGB image that preprocesses to (3, 32, 32)."""
    try:
        img = load_image(data, draft_size=32)
    except ImageError as exc:
        assert exc.code in ("undecodable", "too_large"), exc.code
        event(f"ImageError {exc.code}")
        return
    event("decoded")
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
    assert tuple(preprocess(img, 32).shape) == (3, 32, 32)


@FUZZ
@given(st.binary(max_size=4096))
def test_load_image_arbitrary_bytes(data: bytes) -> None:
    check_decoding(data)


@FUZZ
@given(st.sampled_from(MAGICS), st.binary(max_size=2048))
def test_load_image_magic_number_then_garbage(magic: bytes, rest: bytes) -> None:
    check_decoding(magic + rest)


@FUZZ
@given(mutated_image())
def test_load_image_mutated_valid_images(data: bytes) -> None:
    check_decoding(data)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seeds_are_valid(name: str) -> None:
    """The mutation seeds themselves decode (so mutations start from real images)."""
    assert load_image(SEEDS[name]).mode == "RGB"


def test_png_with_recomputed_crcs_still_only_raises_image_error() -> None:
    """PNG chunks carry CRCs, so random mutations mostly stop at the first check; here the IHDR is
    rewritten with a valid CRC for many extreme geometries, reaching the decoder itself."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    body = SEEDS["png"][33:]  # everything after the IHDR chunk
    for width, height in [
        (1, 1),
        (0, 5),
        (5, 0),
        (24, 18),
        (18, 24),
        (1, 10**6),
        (10**6, 1),
        (7071, 7071),
        (2**31 - 1, 1),
        (2**32 - 1, 2**32 - 1),
    ]:
        for depth, colour in [(8, 2), (16, 2), (1, 0), (8, 3), (8, 6), (4, 4), (8, 7)]:
            ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
            check_decoding(b"\x89PNG\r\n\x1a\n" + ihdr + body)


# ---------------------------------------------------------------- the upload endpoint
# Every error code an upload can get, with the one status that goes with it (service/app.py, service/errors.py).
STATUS_OF_CODE = {
    "invalid_parameter": 400,
    "missing_image": 400,
    "undecodable": 400,
    "bad_request": 400,
    "too_large": 413,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "too_slow": 422,
}
CONTENT_TYPES = [
    "image/jpeg",
    "image/png",
    "image/gif",
    "image/webp",
    "application/octet-stream",
    "image/svg+xml",
    "text/plain",
    "application/json",
    "application/x-www-form-urlencoded",
    "",
    "image/",
    "multipart/form-data",
    "multipart/form-data; boundary=",
    "image/jpeg; charset=utf-8",
]
PARAM_NAMES = ["beam_size", "max_length", "n_best", "attention", "image", "other"]
PARAM_VALUES = st.one_of(
    st.integers(-3, 70).map(str),
    st.sampled_from(["none", "grid", "overlay", "", " 3 ", "1e3", "0x3", "٣", "nan", "-0", "+2"]),
    st.text(max_size=12),
)


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    """One app for the whole module (hypothesis runs many examples through it); 1 MiB upload limit."""
    model = Captioner.load(tiny_checkpoint, device="cpu")
    app = create_app(
        {
            "CAPTIONER_MODEL": str(tiny_checkpoint),
            "CAPTIONER_INSTANCE": model,
            "TESTING": True,
            "CAPTIONER_LOAD_IN_BACKGROUND": False,
            "CAPTIONER_BATCH_WAIT_MS": 0,
            "CAPTIONER_MAX_UPLOAD_MB": 1,
        }
    )
    yield app.test_client()
    app.extensions[EXTENSION_KEY].close()


def check_response(response) -> None:
    """A caption (200), or a JSON error whose code is one an upload may get, with that code's status."""
    body = response.get_json()
    assert body is not None, (response.status_code, response.get_data(as_text=True)[:300])
    event(f"{response.status_code} {body['error']['code'] if 'error' in body else 'caption'}")
    if response.status_code == 200:
        assert isinstance(body["caption"], str) and body["caption"]
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}, body
        code = body["error"]["code"]
        assert code in STATUS_OF_CODE, body
        assert response.status_code == STATUS_OF_CODE[code], (response.status_code, body)


BODIES = st.one_of(
    mutated_image(),
    st.binary(max_size=2048),
    st.sampled_from(list(SEEDS.values())),
    st.builds(lambda m, r: m + r, st.sampled_from(MAGICS), st.binary(max_size=512)),
)


IMAGE_TYPES = st.sampled_from(["image/jpeg", "image/png", "application/octet-stream"])
# Half the examples have no parameters, so that most bodies reach the decoder.
PARAMS = st.one_of(st.just({}), st.dictionaries(st.sampled_from(PARAM_NAMES), PARAM_VALUES, max_size=3))


@FUZZ
@given(body=BODIES, content_type=st.one_of(IMAGE_TYPES, st.sampled_from(CONTENT_TYPES)), params=PARAMS)
def test_upload_raw_body(client, body: bytes, content_type: str, params: dict[str, str]) -> None:
    check_response(client.post("/v1/captions", data=body, content_type=content_type, query_string=params))


@FUZZ
@given(
    body=BODIES,
    part_type=st.one_of(IMAGE_TYPES, st.sampled_from(CONTENT_TYPES)),
    filename=st.text(max_size=40),
    fields=st.one_of(
        st.just({}), st.dictionaries(st.sampled_from([*PARAM_NAMES[:4], "other"]), PARAM_VALUES, max_size=3)
    ),
    params=PARAMS,
)
def test_upload_multipart(
    client, body: bytes, part_type: str, filename: str, fields: dict[str, str], params: dict[str, str]
) -> None:
    form = {"image": (io.BytesIO(body), filename, part_type), **fields}
    check_response(client.post("/v1/captions", data=form, content_type="multipart/form-data", query_string=params))


def test_service_ready_after_fuzzing(client) -> None:
    assert client.get("/readyz").status_code == 200
