"""``captioner data``: verify / stats / download / prepare on tiny generated datasets (offline, loopback only)."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from captioner.commands import data as data_command
from captioner.commands.main import main
from captioner.datasets import download, load_records, stats, verify

from conftest import image_bytes, make_image

CAPS = [
    "a dog runs on the grass",
    "a cat sits on a red ball",
    "a man throws a blue ball",
    "two dogs play in the snow",
    "a girl rides a red bike",
    "the dog sits on the grass",
]


def _kinds(manifest: dict) -> dict[str, dict]:
    return {p["kind"]: p for p in manifest["problems"]}


def _jpeg(folder: Path, name: str, seed: int) -> bytes:
    data = image_bytes(make_image(seed, (40, 30)), "JPEG", quality=85)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return data


# ---------------------------------------------------------------- fixtures: one per format
def make_flickr(root: Path, quirks: bool = True) -> Path:
    """Flickr8k layout: images/, Flickr8k.token.txt, Flickr_8k.{train,dev,test}Images.txt.

    Quirks: ``ghost.jpg`` has captions but no image; ``copy.jpg`` is byte-identical to ``a0.jpg``;
    ``extra.jpg`` is in no split; ``broken.jpg`` is a truncated JPEG; ``b0.jpg`` repeats a caption.
    """
    images = root / "images"
    names = {
        "train": ["a0.jpg", "a1.jpg", "a2.jpg", "a3.jpg"],
        "dev": ["b0.jpg", "b1.jpg"],
        "test": ["c0.jpg", "c1.jpg"],
    }
    all_names = [n for split_names in names.values() for n in split_names]
    for i, n in enumerate(all_names):
        _jpeg(images, n, i)
    lines = []
    if quirks:
        (images / "copy.jpg").write_bytes((images / "a0.jpg").read_bytes())
        _jpeg(images, "extra.jpg", 50)
        (images / "broken.jpg").write_bytes(image_bytes(make_image(60, (64, 48)), "JPEG")[:300])
        names["train"] += ["copy.jpg", "broken.jpg"]
        all_names += ["copy.jpg", "broken.jpg", "extra.jpg", "ghost.jpg"]
    for k, n in enumerate(all_names):
        caps = [CAPS[(k + j) % len(CAPS)] for j in range(3)]
        if quirks and n == "b0.jpg":
            caps[2] = caps[0].upper()  # the same caption twice (ignoring case)
        lines += [f"{n}#{j}\t{c}" for j, c in enumerate(caps)]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for split, ns in names.items():
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(ns) + "\n")
    return root


def make_karpathy(root: Path) -> Path:
    images = []
    for i, (split, fp) in enumerate([("train", "tr"), ("restval", "tr"), ("val", "va"), ("test", "va")]):
        _jpeg(root / fp, f"k{i}.jpg", i)
        images.append(
            {
                "filepath": fp,
                "filename": f"k{i}.jpg",
                "split": split,
                "sentences": [{"raw": CAPS[i]}, {"tokens": CAPS[i + 1].split()}],
            }
        )
    images.append({"filepath": "va", "filename": "gone.jpg", "split": "test", "sentences": [{"raw": CAPS[0]}]})
    (root / "dataset_karpathy.json").write_text(json.dumps({"images": images}))
    return root


def make_coco(root: Path) -> Path:
    """Official COCO layout: annotations/captions_{train,val}2014.json + train2014/, val2014/."""
    (root / "annotations").mkdir(parents=True)
    for part, ids in (("train2014", [1, 2, 3]), ("val2014", [4, 5])):
        imgs, anns = [], []
        for i in ids:
            name = f"COCO_{part}_{i:012d}.jpg"
            _jpeg(root / part, name, i)
            imgs.append({"id": i, "file_name": name})
            anns += [{"image_id": i, "id": 10 * i + j, "caption": CAPS[(i + j) % len(CAPS)]} for j in range(2)]
        (root / "annotations" / f"captions_{part}.json").write_text(json.dumps({"images": imgs, "annotations": anns}))
    return root


def make_custom(root: Path, fmt: str = "csv", quirks: bool = False) -> Path:
    """A folder of photos/ plus captions.csv or captions.jsonl (image, caption, split)."""
    rows = []
    for i in range(8):
        split = "train" if i < 5 else ("val" if i < 7 else "test")
        _jpeg(root / "photos", f"p{i}.jpg", i)
        rows += [{"image": f"photos/p{i}.jpg", "caption": CAPS[(i + j) % len(CAPS)], "split": split} for j in range(2)]
    if quirks:
        rows.append({"image": "photos/p0.jpg", "caption": "a dog", "split": "test"})  # p0 in train and test
        rows.append({"image": "photos/p1.jpg", "caption": "  ", "split": "train"})  # empty caption
        rows.append({"image": "photos/missing.jpg", "caption": "nothing here", "split": "train"})
    if fmt == "csv":
        with (root / "captions.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, ["image", "caption", "split"])
            w.writeheader()
            w.writerows(rows)
    else:
        (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# ---------------------------------------------------------------- verify
def test_verify_flickr_reports_every_injected_quirk(tmp_path: Path) -> None:
    root = make_flickr(tmp_path / "f8k")
    m = verify.verify_dataset("flickr8k", root, progress=False, max_bad_fraction=0.2)
    kinds = _kinds(m)
    assert m["usable"]  # warnings only
    assert kinds["caption_entry_without_image"]["examples"] == ["ghost.jpg"]
    assert kinds["duplicate_images"]["examples"] == ["a0.jpg = copy.jpg"]
    assert kinds["images_in_no_split"]["examples"] == ["extra.jpg"]
    assert kinds["undecodable_images"]["count"] == 1 and kinds["undecodable_images"]["examples"][0].startswith(
        "broken.jpg"
    )
    assert kinds["duplicate_captions"]["examples"][0].startswith("b0.jpg")
    assert "split_overlap" not in kinds and "images_without_captions" not in kinds
    assert m["splits"]["train"] == {"images": 6, "usable_images": 5, "captions": 18}
    assert m["splits"]["dev"]["images"] == 2 and m["splits"]["test"]["images"] == 2
    assert m["counts"]["images_found"] == 11 and m["counts"]["missing_images"] == 1
    token = tmp_path / "f8k" / "Flickr8k.token.txt"
    assert m["caption_file"] == "Flickr8k.token.txt"
    assert m["caption_file_sha256"] == hashlib.sha256(token.read_bytes()).hexdigest()
    assert set(m["annotation_files"]) == {
        "Flickr8k.token.txt",
        "Flickr_8k.trainImages.txt",
        "Flickr_8k.devImages.txt",
        "Flickr_8k.testImages.txt",
    }
    # 1 of 10 split images broken is above the default 5%: fatal
    strict = verify.verify_dataset("flickr8k", root, progress=False)
    assert not strict["usable"] and _kinds(strict)["too_many_bad_images"]["count"] == 1


def test_verify_clean_flickr_has_no_problems(tmp_path: Path) -> None:
    m = verify.verify_dataset("flickr8k", make_flickr(tmp_path / "f8k", quirks=False), progress=False)
    assert m["usable"] and m["problems"] == []
    assert m["counts"]["images_decoded"] == 8


def test_verify_flickr_split_overlap_and_unlisted_images_are_found(tmp_path: Path) -> None:
    root = make_flickr(tmp_path / "f8k", quirks=False)
    (root / "Flickr_8k.testImages.txt").write_text("c0.jpg\nc1.jpg\na0.jpg\n")  # a0 is also in train
    _jpeg(root / "images", "stray.jpg", 77)  # an image no caption entry mentions
    m = verify.verify_dataset("flickr8k", root, progress=False)
    kinds = _kinds(m)
    assert not m["usable"] and kinds["split_overlap"]["severity"] == "fatal"
    assert kinds["split_overlap"]["examples"] == ["a0.jpg (train+test)"]
    assert kinds["images_without_captions"]["examples"] == ["images/stray.jpg"]


def test_verify_karpathy_json(tmp_path: Path) -> None:
    m = verify.verify_dataset("karpathy", make_karpathy(tmp_path / "kp"), progress=False, max_bad_fraction=0.25)
    assert m["usable"]
    assert {s: v["images"] for s, v in m["splits"].items()} == {"train": 2, "dev": 1, "test": 2}
    assert _kinds(m)["caption_entry_without_image"]["examples"] == ["gone.jpg"]
    assert m["caption_file"] == "dataset_karpathy.json"


def test_verify_coco_json(tmp_path: Path) -> None:
    root = make_coco(tmp_path / "coco")
    (root / "val2014" / "COCO_val2014_000000000005.jpg").write_bytes(b"not a jpeg")
    m = verify.verify_dataset("coco", root, progress=False, max_bad_fraction=0.1)
    kinds = _kinds(m)
    assert m["splits"]["train"]["images"] == 3 and m["splits"]["dev"]["images"] == 2
    assert kinds["undecodable_images"]["examples"][0].startswith("COCO_val2014_000000000005.jpg")
    assert kinds["too_many_bad_images"]["severity"] == "fatal" and not m["usable"]  # 1 of 5 > 10%
    assert set(m["annotation_files"]) == {"annotations/captions_train2014.json", "annotations/captions_val2014.json"}


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_verify_custom_table(tmp_path: Path, fmt: str) -> None:
    m = verify.verify_dataset("custom", make_custom(tmp_path / "mine", fmt), progress=False)
    assert m["usable"] and m["problems"] == []
    assert {s: v["images"] for s, v in m["splits"].items()} == {"train": 5, "dev": 2, "test": 1}
    assert m["caption_file"] == f"captions.{fmt}"


def test_verify_custom_table_quirks(tmp_path: Path) -> None:
    m = verify.verify_dataset("custom", make_custom(tmp_path / "mine", "jsonl", quirks=True), progress=False)
    kinds = _kinds(m)
    assert not m["usable"] and kinds["split_overlap"]["examples"] == ["photos/p0.jpg (test+train)"]
    assert kinds["empty_captions"]["examples"] == ["row 18: photos/p1.jpg"]
    assert kinds["caption_entry_without_image"]["examples"] == ["photos/missing.jpg"]


def test_verify_unreadable_dataset_is_fatal(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    m = verify.verify_dataset("flickr8k", tmp_path / "empty", progress=False)
    assert not m["usable"] and m["problems"][0]["kind"] == "unreadable"


def test_verify_cli_writes_manifest_outside_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = make_flickr(tmp_path / "f8k")
    root.chmod(0o555)  # the data folder may be read-only
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    try:
        assert (
            main(
                [
                    "data",
                    "verify",
                    "--dataset",
                    "flickr8k",
                    "--data-dir",
                    str(root),
                    "--quiet",
                    "--max-bad-fraction",
                    "0.2",
                ]
            )
            == 0
        )
    finally:
        root.chmod(0o755)
    out = capsys.readouterr().out
    assert "caption_entry_without_image" in out and "usable: yes" in out
    manifest = json.loads((work / "manifest-flickr8k.json").read_text())
    assert manifest["counts"]["duplicate_image_groups"] == 1
    assert not (root / "manifest.json").exists()
    # fatal -> exit 1, and the manifest still says why
    (root / "Flickr_8k.trainImages.txt").write_text("nothing.jpg\n")
    target = tmp_path / "m.json"
    assert (
        main(["data", "verify", "--dataset", "flickr8k", "--data-dir", str(root), "--output", str(target), "--quiet"])
        == 1
    )
    assert "no_train_images" in {p["kind"] for p in json.loads(target.read_text())["problems"]}


# ---------------------------------------------------------------- stats
def test_stats_custom_figures_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_custom(tmp_path / "mine", "csv")
    figures, lengths = stats.dataset_stats("custom", root, min_counts=(1, 2))
    assert figures["images"] == 8 and figures["captions"] == 16
    assert figures["splits"]["train"]["captions"] == 10 and figures["splits"]["test"]["images"] == 1
    train_caps = [CAPS[(i + j) % len(CAPS)] for i in range(5) for j in range(2)]
    words = {w for c in train_caps for w in c.split()}
    v1, v2 = figures["vocabulary"]
    assert v1["words"] == len(words) and v1["vocab_size"] == len(words) + 4
    assert v2["words"] < v1["words"]
    test_tokens = [w for j in range(2) for w in CAPS[(7 + j) % len(CAPS)].split()]
    assert v1["test_oov"] == round(sum(w not in words for w in test_tokens) / len(test_tokens), 4)
    lens = sorted(len(c.split()) for c in train_caps)
    assert figures["splits"]["train"]["length"]["max"] == lens[-1]
    assert lengths["train"] and sorted(lengths["train"]) == lens

    png = tmp_path / "plots" / "lengths.png"
    assert (
        main(
            ["data", "stats", "--dataset", "custom", "--data-dir", str(root), "--min-counts", "1,2", "--plot", str(png)]
        )
        == 0
    )
    assert "test OOV" in capsys.readouterr().out
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 300
    assert main(["data", "stats", "--dataset", "custom", "--data-dir", str(root), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert [r["min_count"] for r in parsed["vocabulary"]] == [1, 3, 5, 10]


def test_stats_flickr_includes_no_split_images(tmp_path: Path) -> None:
    figures, _ = stats.dataset_stats("flickr8k", make_flickr(tmp_path / "f8k"))
    assert figures["splits"]["none"]["images"] == 2  # extra.jpg and ghost.jpg
    assert figures["splits"]["none"]["images_on_disk"] == 1


def test_min_counts_parser_rejects_bad_values() -> None:
    assert data_command.min_counts("5,1,3") == (1, 3, 5)
    with pytest.raises(argparse.ArgumentTypeError, match=">= 1"):
        data_command.min_counts("0,2")
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated integers, got 'a'"):
        data_command.min_counts("a")
    with pytest.raises(argparse.ArgumentTypeError, match=">= 1"):
        data_command.min_counts(" , ")


# ---------------------------------------------------------------- download (loopback only)
class _Server:
    """Serves ``files`` on 127.0.0.1 with Range support; names in ``truncate`` are cut short once."""

    def __init__(self, files: dict[str, bytes], truncate: set[str] = frozenset(), honour_range: bool = True) -> None:
        self.files, self.truncate, self.requests = files, set(truncate), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                outer.requests.append((name, rng))
                data = outer.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng and honour_range else 0
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in outer.truncate:
                    outer.truncate.discard(name)
                    body = body[: len(body) // 2]
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _flickr_archives(tmp_path: Path) -> dict[str, bytes]:
    """Flickr8k_Dataset.zip / Flickr8k_text.zip as the originals are laid out (plus macOS junk)."""
    src = make_flickr(tmp_path / "src", quirks=False)
    images = {f"Flicker8k_Dataset/{p.name}": p.read_bytes() for p in sorted((src / "images").iterdir())}
    images["__MACOSX/Flicker8k_Dataset/._a0.jpg"] = b"junk"
    text = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    text["Flickr8k.lemma.token.txt"] = b"a0.jpg#0\tdog run\n"  # must not be unpacked (the reader would pick it)
    text["readme.txt"] = b"hi"
    return {"Flickr8k_Dataset.zip": _zip(images), "Flickr8k_text.zip": _zip(text)}


def test_download_file_resumes_with_range(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 400
    with _Server({"f.bin": payload}, truncate={"f.bin"}) as srv:
        digest = download.download_file(f"{srv.url}/f.bin", tmp_path / "f.bin", retries=2, backoff=0, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == payload and digest == hashlib.sha256(payload).hexdigest()
    assert srv.requests == [("f.bin", None), ("f.bin", f"bytes={len(payload) // 2}-")]
    assert not (tmp_path / "f.bin.part").exists()


def test_download_file_resumes_an_earlier_partial_and_handles_servers_ignoring_range(tmp_path: Path) -> None:
    payload = b"0123456789" * 1000
    (tmp_path / "a.bin.part").write_bytes(payload[:3000])  # left by an interrupted run
    with _Server({"a.bin": payload}) as srv:
        download.download_file(f"{srv.url}/a.bin", tmp_path / "a.bin", progress=False)
    assert srv.requests == [("a.bin", "bytes=3000-")] and (tmp_path / "a.bin").read_bytes() == payload
    (tmp_path / "b.bin.part").write_bytes(b"garbage!")
    with _Server({"b.bin": payload}, honour_range=False) as srv:
        download.download_file(f"{srv.url}/b.bin", tmp_path / "b.bin", progress=False)
    assert (tmp_path / "b.bin").read_bytes() == payload  # restarted from byte 0


def test_download_file_checksum_mismatch_and_http_errors(tmp_path: Path) -> None:
    with _Server({"x.bin": b"abc"}) as srv:
        with pytest.raises(download.DownloadError, match="does not match"):
            download.download_file(f"{srv.url}/x.bin", tmp_path / "x.bin", sha256="0" * 64, progress=False)
        assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.bin.part").exists()
        good = hashlib.sha256(b"abc").hexdigest()
        assert download.download_file(f"{srv.url}/x.bin", tmp_path / "x.bin", sha256=good, progress=False) == good
        with pytest.raises(download.DownloadError, match="404"):
            download.download_file(f"{srv.url}/nope.bin", tmp_path / "nope.bin", progress=False)
    with pytest.raises(download.DownloadError, match="http"):
        download.download_file("file:///etc/passwd", tmp_path / "p", progress=False)


def test_download_flickr8k_from_loopback_mirror_then_verify(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    archives = _flickr_archives(tmp_path)
    dest = tmp_path / "data" / "flickr8k"
    with _Server(archives, truncate={"Flickr8k_Dataset.zip"}) as srv:
        digests = download.download_dataset(
            "flickr8k", dest, url_base=srv.url, progress=False, backoff=0, allow_unverified=True
        )
        n_requests = len(srv.requests)
        # a rerun finds everything done and fetches nothing
        assert (
            download.download_dataset("flickr8k", dest, url_base=srv.url, progress=False, checksums=digests) == digests
        )
        assert len(srv.requests) == n_requests
    assert ("Flickr8k_Dataset.zip", f"bytes={len(archives['Flickr8k_Dataset.zip']) // 2}-") in srv.requests
    assert digests == {n: hashlib.sha256(b).hexdigest() for n, b in archives.items()}
    assert (dest / "Flicker8k_Dataset" / "a0.jpg").is_file() and (dest / "Flickr8k.token.txt").is_file()
    assert not (dest / "__MACOSX").exists() and not (dest / "Flickr8k.lemma.token.txt").exists()
    assert (dest / "archives" / "SHA256SUMS").read_text().count("\n") == 2
    m = verify.verify_dataset("flickr8k", dest, progress=False)
    assert m["usable"] and m["problems"] == [] and m["splits"]["train"]["usable_images"] == 4


def test_download_cli_manual_dataset_prints_instructions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(["data", "download", "--dataset", "flickr8k", "--dest", str(tmp_path / "d")]) == data_command.EXIT_MANUAL
    )
    out = capsys.readouterr().out
    assert "request form" in out and "--url-base" in out
    assert not (tmp_path / "d").exists()


def test_download_cli_with_mirror_prints_checksums(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    archives = _flickr_archives(tmp_path)
    with _Server(archives) as srv:
        rc = main(
            [
                "data",
                "download",
                "--dataset",
                "flickr8k",
                "--dest",
                str(tmp_path / "d"),
                "--url-base",
                srv.url,
                "--quiet",
                "--remove-archives",
                "--allow-unverified",
            ]
        )
    out = capsys.readouterr().out
    assert rc == 0 and hashlib.sha256(archives["Flickr8k_text.zip"]).hexdigest() in out
    assert "computed" in out and "captioner train --dataset flickr8k" in out
    assert not (tmp_path / "d" / "archives" / "Flickr8k_text.zip").exists()


def test_download_refuses_archives_without_a_checksum(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """No archive is fetched unless each has an expected sha256 or --allow-unverified is given; built-in
    URLs are https."""
    archives = _flickr_archives(tmp_path)
    with _Server(archives) as srv:
        argv = [
            "data",
            "download",
            "--dataset",
            "flickr8k",
            "--dest",
            str(tmp_path / "d"),
            "--url-base",
            srv.url,
            "--quiet",
        ]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "no published sha256" in err and "--allow-unverified" in err
        assert srv.requests == [] and not (tmp_path / "d").exists()
        good = [f"--sha256={n}={hashlib.sha256(b).hexdigest()}" for n, b in archives.items()]
        assert main([*argv, *good]) == 0  # every archive pinned: downloaded and verified
        assert capsys.readouterr().out.count("verified") == len(archives)
    public = [f for source in download.SOURCES.values() for f in source.files if f.url]
    assert public and all(f.url.startswith("https://") for f in public), [f.url for f in public]
    # every archive with a public URL carries a pinned checksum; only the request-form Flickr archives do not
    assert all(re.fullmatch(r"[0-9a-f]{64}", f.sha256 or "") for f in public), [f.name for f in public if not f.sha256]


def test_safe_extract_refuses_path_traversal(tmp_path: Path) -> None:
    for evil in ("../evil.txt", "/abs/evil.txt", "a/../../evil.txt", "C:/evil.txt"):
        archive = tmp_path / "evil.zip"
        archive.write_bytes(_zip({"ok.txt": b"ok", evil: b"boom"}))
        with pytest.raises(download.DownloadError, match="unsafe"):
            download.safe_extract(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "ok.txt").exists()
    # a symbolic link inside a zip
    link = zipfile.ZipInfo("link")
    link.external_attr = 0o120777 << 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    (tmp_path / "link.zip").write_bytes(buf.getvalue())
    with pytest.raises(download.DownloadError, match="link"):
        download.safe_extract(tmp_path / "link.zip", tmp_path / "out2", progress=False)
    # tar: traversal and symlinks are refused too, plain members unpack
    for name, kind in (("../t.txt", tarfile.REGTYPE), ("sl", tarfile.SYMTYPE)):
        tbuf = io.BytesIO()
        with tarfile.open(fileobj=tbuf, mode="w:gz") as tf:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            tf.addfile(info, io.BytesIO(b""))
        (tmp_path / "t.tar.gz").write_bytes(tbuf.getvalue())
        with pytest.raises(download.DownloadError):
            download.safe_extract(tmp_path / "t.tar.gz", tmp_path / "out3", progress=False)
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w:gz") as tf:
        info = tarfile.TarInfo("flickr30k-images/1.jpg")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"jpg"))
    (tmp_path / "ok.tar.gz").write_bytes(tbuf.getvalue())
    download.safe_extract(tmp_path / "ok.tar.gz", tmp_path / "out4", progress=False)
    assert (tmp_path / "out4" / "flickr30k-images" / "1.jpg").read_bytes() == b"jpg"
    with pytest.raises(download.DownloadError, match="neither"):
        (tmp_path / "n.bin").write_bytes(b"x")
        download.safe_extract(tmp_path / "n.bin", tmp_path / "out5", progress=False)


# ---------------------------------------------------------------- COCO 2017 + Karpathy split -> custom CSV
def test_prepare_coco2017_karpathy_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "coco2017"
    _jpeg(root / "train2017", "000000000001.jpg", 1)
    _jpeg(root / "val2017", "000000000002.jpg", 2)
    _jpeg(root / "train2017", "000000000003.jpg", 3)
    karpathy = {
        "images": [
            {
                "filepath": "train2014",
                "filename": "COCO_train2014_000000000001.jpg",
                "split": "train",
                "sentences": [{"raw": CAPS[0]}, {"raw": CAPS[1]}],
            },
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_000000000002.jpg",
                "split": "test",
                "sentences": [{"raw": CAPS[2]}],
            },
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_000000000003.jpg",
                "split": "restval",
                "sentences": [{"raw": CAPS[3]}],
            },
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_000000000004.jpg",
                "split": "val",
                "sentences": [{"raw": CAPS[4]}],
            },
        ]
    }
    (root / "karpathy").mkdir()
    (root / "karpathy" / "dataset_coco.json").write_text(json.dumps(karpathy))
    out = tmp_path / "elsewhere" / "captions.csv"  # the data folder may be read-only
    assert main(["data", "prepare", "--data-dir", str(root), "--output", str(out)]) == 0
    assert "missing 1" in capsys.readouterr().out
    recs = {r.image_id: r for r in load_records("custom", out.parent, "all", annotations=out, require_images=False)}
    assert (
        Path(recs["../coco2017/train2017/000000000001.jpg"].path).resolve()
        == (root / "train2017" / "000000000001.jpg").resolve()
    )
    assert recs["../coco2017/val2017/000000000002.jpg"].split == "test"
    assert recs["../coco2017/train2017/000000000003.jpg"].split == "train"  # restval counts as train
    assert len(recs["../coco2017/train2017/000000000001.jpg"].captions) == 2
    m = verify.verify_dataset("custom", out.parent, annotations=out, progress=False, max_bad_fraction=0.3)
    assert m["usable"] and m["counts"]["missing_images"] == 1


def test_parse_checksums() -> None:
    assert download.parse_checksums(["a.zip=" + "AB" * 32]) == {"a.zip": "ab" * 32}
    with pytest.raises(download.DownloadError):
        download.parse_checksums(["a.zip"])


def test_sources_are_consistent() -> None:
    for name, src in download.SOURCES.items():
        assert src.files, name
        assert bool(src.manual) == any(f.url is None for f in src.files), name
        for f in src.files:
            assert f.url is None or f.url.startswith(("http://", "https://"))
