"""``captioner data download``: fetch a dataset's public archives and unpack them safely.

Each archive is checked against a pinned (or given) sha256, an interrupted transfer resumes with
an HTTP Range request, and unpacking refuses absolute paths, ``..``, links and devices. Datasets
behind a request form (Flickr8k/30k) have no URL: :class:`DownloadError` carries the instructions.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .prepare import KARPATHY_URL, coco2017_table


class DownloadError(RuntimeError):
    """A download or unpack step failed (the message says how to resume)."""


@dataclass(frozen=True)
class RemoteFile:
    """One archive of a dataset. ``url`` None: only reachable with ``--url-base`` (manual datasets)."""

    name: str
    url: str | None
    # None: no published checksum (the Flickr archives, which have no public URL either): such an archive is
    # downloaded only with --sha256 NAME=HEX or an explicit --allow-unverified.
    sha256: str | None = None
    members: tuple[str, ...] = ()  # fnmatch patterns of archive members to extract (empty: all)
    into: str = ""  # sub-folder of DEST to unpack into
    flatten: bool = False  # drop the members' folders
    size: str = ""


# Published checksums: TensorFlow Datasets' url_checksums/coco_captions.txt (the same archives and sizes).
KARPATHY_SHA256 = "4cfd70132527b80933105e5829dc9034eaab9573482e2e680abbab6130244817"
COCO = "https://images.cocodataset.org"


def _karpathy(which: str, into: str = "") -> RemoteFile:
    return RemoteFile(
        "caption_datasets.zip",
        KARPATHY_URL,
        sha256=KARPATHY_SHA256,
        members=(f"*dataset_{which}.json",),
        into=into,
        flatten=True,
    )


@dataclass(frozen=True)
class DatasetSource:
    files: tuple[RemoteFile, ...]
    reader: str  # --dataset value for verify/train
    manual: str = ""  # instructions when some archives need a request form
    after: str = ""  # extra step after unpacking


SOURCES: dict[str, DatasetSource] = {
    "flickr8k": DatasetSource(
        files=(
            RemoteFile("Flickr8k_Dataset.zip", None, size="1.1 GB"),
            RemoteFile(
                "Flickr8k_text.zip", None, members=("*Flickr8k.token.txt", "*Flickr_8k.*Images.txt"), flatten=True
            ),
        ),
        reader="flickr8k",
        manual=(
            "Flickr8k is distributed by the University of Illinois after a request form "
            "(https://hockenmaier.cs.illinois.edu/8k-pictures.html); there is no public direct link. "
            "Request it, then either unpack Flickr8k_Dataset.zip and Flickr8k_text.zip into DEST yourself, or "
            "serve both archives from a folder/web server you control and rerun with --url-base URL."
        ),
    ),
    "flickr30k": DatasetSource(
        files=(RemoteFile("flickr30k-images.tar.gz", None, size="4.4 GB"), _karpathy("flickr30k")),
        reader="flickr30k",
        manual=(
            "Flickr30k images are distributed by the University of Illinois after a request form "
            "(https://shannon.cs.illinois.edu/DenotationGraph/); there is no public direct link. "
            "Request them, unpack the images into DEST/flickr30k-images/ and put dataset_flickr30k.json "
            f"(from {KARPATHY_URL}) in DEST, or serve flickr30k-images.tar.gz and caption_datasets.zip "
            "yourself and rerun with --url-base URL."
        ),
    ),
    "coco2014": DatasetSource(
        files=(
            RemoteFile(
                "annotations_trainval2014.zip",
                f"{COCO}/annotations/annotations_trainval2014.zip",
                members=("annotations/captions_*.json",),
                sha256="031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009",
                size="241 MB",
            ),
            _karpathy("coco"),
            RemoteFile(
                "val2014.zip",
                f"{COCO}/zips/val2014.zip",
                sha256="fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0",
                size="6.2 GB",
            ),
            RemoteFile(
                "train2014.zip",
                f"{COCO}/zips/train2014.zip",
                sha256="ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775",
                size="13 GB",
            ),
        ),
        reader="coco",
    ),
    "coco2017": DatasetSource(
        files=(
            RemoteFile(
                "annotations_trainval2017.zip",
                f"{COCO}/annotations/annotations_trainval2017.zip",
                members=("annotations/captions_*.json",),
                sha256="113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268",
                size="241 MB",
            ),
            _karpathy("coco", into="karpathy"),
            RemoteFile(
                "val2017.zip",
                f"{COCO}/zips/val2017.zip",
                sha256="4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05",
                size="0.8 GB",
            ),
            RemoteFile(
                "train2017.zip",
                f"{COCO}/zips/train2017.zip",
                sha256="69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929",
                size="18 GB",
            ),
        ),
        reader="custom",
        after="prepare",
    ),
}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _url(f: RemoteFile, url_base: str | None) -> str | None:
    return f"{url_base.rstrip('/')}/{f.name}" if url_base else f.url


def download_file(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    retries: int = 3,
    backoff: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> str:
    """Download ``url`` to ``dest`` and return its sha256.

    Data goes to ``dest.part`` first; an interrupted transfer (in this call, retried
    ``retries`` times, or in an earlier run) resumes with an HTTP Range request. A server that
    ignores Range restarts the file. ``sha256`` given: a mismatch raises and keeps nothing.
    """
    dest = Path(dest)
    if not url.lower().startswith(("http://", "https://")):
        raise DownloadError(f"only http(s) URLs are supported: {url}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        digest = sha256_file(dest)
        if sha256 is None or digest == sha256:
            return digest
        dest.rename(dest.with_name(dest.name + ".bad"))
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, timeout, progress)
            break
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code < 500:
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
            if attempt == retries:
                raise DownloadError(f"{url}: {exc}; the partial file {part} is kept, rerun to resume") from exc
            print(f"{dest.name}: {exc}; resuming ({attempt + 1}/{retries})", file=sys.stderr)
            time.sleep(backoff * (attempt + 1))
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256:
        part.unlink()
        raise DownloadError(f"{dest.name}: sha256 {digest} does not match the expected {sha256}; file removed")
    part.replace(dest)
    return digest


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    """One HTTP attempt, appending to ``part`` when the server honours Range."""
    from tqdm import tqdm  # here, not at the top: the command-line parser imports this module for SOURCES

    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "captioner-data/1"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch: the part is complete
            return
        raise
    with resp:
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            if not (have and resp.headers.get("Content-Range", "").startswith(f"bytes {have}-")):
                part.unlink(missing_ok=True)  # a range we did not ask for: start again
                raise ConnectionError(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            mode = "ab"
        else:  # 200: the whole file (a server that ignores Range restarts it)
            mode, have = "wb", 0
        total = have + int(length) if length and length.isdigit() else None
        with (
            part.open(mode) as fh,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name[: -len(".part")],
                disable=not progress,
            ) as bar,
        ):
            while block := resp.read(1 << 20):
                fh.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    if total is not None and size < total:
        raise ConnectionError(f"connection closed after {size} of {total} bytes")


def _safe_target(dest: Path, name: str, flatten: bool) -> Path | None:
    """Where archive member ``name`` goes under ``dest``; None for junk; raises on path traversal."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or parts[0] == "__MACOSX" or parts[-1].startswith("._"):
        return None
    if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
        raise DownloadError(f"unsafe path in archive: {name!r}")
    target = dest.joinpath(parts[-1] if flatten else Path(*parts))
    root = dest.resolve()
    if not target.resolve().is_relative_to(root):
        raise DownloadError(f"unsafe path in archive: {name!r}")
    return target


def _wanted(name: str, members: tuple[str, ...]) -> bool:
    return not members or any(fnmatch.fnmatch(name, m) for m in members)


def safe_extract(
    archive: str | Path, dest: str | Path, members: tuple[str, ...] = (), flatten: bool = False, progress: bool = True
) -> list[Path]:
    """Unpack a zip or tar archive under ``dest``, refusing absolute paths, ``..``, links and devices."""
    from tqdm import tqdm

    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir() and _wanted(i.filename, members)]
            for info in infos:
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise DownloadError(f"refusing symbolic link in archive: {info.filename!r}")
            targets = [(i, _safe_target(dest, i.filename, flatten)) for i in infos]
            _check_space(dest, sum(i.file_size for i, t in targets if t is not None))
            for info, target in tqdm(targets, desc=f"unpacking {archive.name}", unit="file", disable=not progress):
                if target is None:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".unpacking")
                with zf.open(info) as src, tmp.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                tmp.replace(target)
                written.append(target)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            infos = [m for m in tf.getmembers() if not m.isdir() and _wanted(m.name, members)]
            for m in infos:
                if not m.isfile():
                    raise DownloadError(f"refusing link or special file in archive: {m.name!r}")
            targets = [(m, _safe_target(dest, m.name, flatten)) for m in infos]
            _check_space(dest, sum(m.size for m, t in targets if t is not None))
            for m, target in tqdm(targets, desc=f"unpacking {archive.name}", unit="file", disable=not progress):
                if target is None:
                    continue
                m.name = str(target.relative_to(dest))
                tf.extract(m, dest, filter="data")
                written.append(target)
    else:
        raise DownloadError(f"{archive} is neither a zip nor a tar archive")
    return written


def _check_space(dest: Path, needed: int) -> None:
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise DownloadError(f"unpacking needs {needed / 1e9:.1f} GB but only {free / 1e9:.1f} GB is free in {dest}")


def download_dataset(
    dataset: str,
    dest: str | Path,
    url_base: str | None = None,
    checksums: dict[str, str] | None = None,
    remove_archives: bool = False,
    progress: bool = True,
    retries: int = 3,
    backoff: float = 2.0,
    allow_unverified: bool = False,
) -> dict[str, str]:
    """Download and unpack a dataset's archives into ``dest``; returns archive name -> sha256.

    Archives are kept in ``dest/archives`` (resumable; a rerun skips finished steps) unless
    ``remove_archives``. Every archive must have an expected sha256 (pinned in :data:`SOURCES` or
    given in ``checksums``) unless ``allow_unverified``. Raises :class:`DownloadError` when a file
    has no URL (manual datasets) or no checksum, before anything is downloaded.
    """
    source = SOURCES[dataset]
    dest = Path(dest)
    missing = [f.name for f in source.files if _url(f, url_base) is None]
    if missing:
        raise DownloadError(source.manual)
    unverified = [f.name for f in source.files if not ({f.name: f.sha256} | (checksums or {})).get(f.name)]
    if unverified and not allow_unverified:
        raise DownloadError(
            f"no published sha256 for {', '.join(unverified)}: give each one as --sha256 NAME=HEX (from a source you "
            "trust), or pass --allow-unverified to download without a check (the computed checksums are printed)"
        )
    archives = dest / "archives"
    marker = dest / ".captioner-unpacked.json"
    done = json.loads(marker.read_text()) if marker.is_file() else {}
    digests: dict[str, str] = {}
    known = {f.name: f.sha256 for f in source.files} | (checksums or {})
    for f in source.files:
        url = _url(f, url_base)
        assert url is not None
        key = f"{f.name}:{f.into}"
        if key in done and not (archives / f.name).exists():
            digests[f.name] = done[key]
            continue
        print(f"{f.name}{f' ({f.size})' if f.size else ''} <- {url}", file=sys.stderr)
        digest = download_file(
            url, archives / f.name, known.get(f.name), retries=retries, backoff=backoff, progress=progress
        )
        digests[f.name] = digest
        if done.get(key) != digest:
            safe_extract(archives / f.name, dest / f.into if f.into else dest, f.members, f.flatten, progress)
            done[key] = digest
            marker.write_text(json.dumps(done, indent=1))
        if remove_archives:
            (archives / f.name).unlink()
    if archives.is_dir():
        with (archives / "SHA256SUMS").open("w") as fh:
            fh.writelines(f"{d}  {n}\n" for n, d in digests.items())
    if source.after == "prepare":
        karpathy = dest / "karpathy" / "dataset_coco.json"
        coco2017_table(karpathy, dest, dest / "captions.csv")
    return digests


def parse_checksums(items: list[str] | None) -> dict[str, str]:
    """``--sha256 NAME=HEX`` values -> {archive name: lower-case hex digest}."""
    out = {}
    for item in items or []:
        name, sep, digest = item.partition("=")
        if not sep or len(digest) != 64:
            raise DownloadError(f"--sha256 expects NAME=<64 hex digits>, got {item!r}")
        out[name] = digest.lower()
    return out
