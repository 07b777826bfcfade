"""What ``captioner caption`` writes: JSONL/CSV/JSON records, the resume scan, torchrun part files, attention files.

Records are written and flushed one at a time, so a kill loses at most the record being
written; :func:`scan_output` reads such a file back (cutting nothing) to resume it. Under
torchrun each rank writes a JSONL part file that rank 0 merges in input order.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .batch import Result

FORMATS = ("jsonl", "csv", "json")
CSV_FIELDS = ["image", "caption", "score", "tokens", "alternatives", "attention", "error", "error_code", "concepts"]
PROG = "captioner caption"


def path_key(path: str) -> str:
    """The identity of an input in an output file (resume, de-duplication)."""
    return os.path.normpath(path)


def output_format(output: str | None, fmt: str | None) -> str:
    """--format if given, else the output's extension (.csv, .json), else jsonl."""
    if fmt:
        return fmt
    suffix = Path(output).suffix.lower().lstrip(".") if output else ""
    return suffix if suffix in ("csv", "json") else "jsonl"


def make_record(result: Result, attention: str | None = None) -> dict[str, Any]:
    """One output record: ``image`` plus ``Caption.to_dict`` without the grids (or ``error``, ``error_code``)."""
    if result.error is not None or result.caption is None:
        return {"image": result.path, "error": result.error, "error_code": result.code}
    rec = {"image": result.path} | result.caption.to_dict(attention=False)
    if attention:
        rec["attention"] = attention
    return rec


# ---------------------------------------------------------------------------- reading an output back (resume)
@dataclass
class Scan:
    """What an existing output file holds: complete records and where the last one ends."""

    status: dict[str, bool] = field(default_factory=dict)  # path key -> failed?
    count: int = 0
    end: int = 0  # byte offset just after the last complete record (a torn tail lies beyond)

    def add(self, rec: Any, end: int) -> None:
        """Count ``rec`` (if it is a record of this tool) as complete up to byte ``end``."""
        if isinstance(rec, dict) and isinstance(rec.get("image"), str):
            self.status[path_key(rec["image"])] = bool(rec.get("error"))
            self.count += 1
            self.end = end


def scan_output(path: str, fmt: str) -> Scan:
    """Read an output written by this tool (possibly killed mid-record), streaming, without changing it."""
    scan = Scan()
    if not os.path.exists(path):
        return scan
    with open(path, "rb") as f:
        if fmt == "csv":
            _scan_csv(f, scan)
        else:
            _scan_lines(f, fmt, path, scan)
    return scan


def _scan_csv(f: IO[bytes], scan: Scan) -> None:
    pos, exhausted = 0, False

    def complete_lines() -> Iterator[str]:
        nonlocal pos, exhausted
        for line in f:
            if not line.endswith(b"\n"):
                break  # a row without its newline is torn
            pos += len(line)
            yield line.decode("utf-8", "surrogateescape")
        exhausted = True

    # A row is complete when the reader returns it without asking for another line. A row that
    # ends only because the lines ran out (a torn quoted field, e.g. a path with a newline) is
    # not kept, and scan.end stays after the last complete row.
    rows = csv.reader(complete_lines())
    try:
        header = next(rows, None)
        if header is None or exhausted:
            return
        scan.end = pos  # the header counts even without rows
        for row in rows:
            if exhausted:
                break
            scan.add(dict(zip(header, row, strict=False)), pos)  # a short row leaves fields out
    except csv.Error:
        pass  # a malformed tail: keep what was complete before it


def _scan_lines(f: IO[bytes], fmt: str, path: str, scan: Scan) -> None:
    """JSONL, or the JSON array this tool writes (one record per line between ``[`` and ``]``)."""
    pos = 0
    for line in f:
        start, pos = pos, pos + len(line)
        body = line.rstrip(b"\r\n")
        if fmt == "json":
            if start == 0:
                if body.strip() != b"[":
                    raise ValueError(f"{path} is not a JSON file written by {PROG}; cannot resume it")
                scan.end = pos
                continue
            if body.strip() == b"]":
                break
            body = body[:-1] if body.endswith(b",") else body
        elif not line.endswith(b"\n"):
            break  # torn last JSONL line
        try:
            rec = json.loads(body)
        except ValueError:
            continue  # torn or foreign line: its image is captioned again
        scan.add(rec, start + len(body) if fmt == "json" else pos)


# ---------------------------------------------------------------------------- writing
def _csv_row(rec: dict[str, Any]) -> dict[str, Any]:
    row = dict(rec)
    for name in ("tokens", "alternatives", "concepts"):
        if name in row:
            row[name] = json.dumps(row[name])
    return row


class RecordWriter:
    """Writes records one at a time, flushed, so a kill loses at most the record being written.

    ``scan`` (from :func:`scan_output`) appends to an existing file after cutting off a torn
    tail; JSON is written as an array with one record per line and closed by :meth:`close`.
    """

    def __init__(self, path: str | None, fmt: str, scan: Scan | None = None) -> None:
        self.path, self.fmt = path, fmt
        append = path is not None and scan is not None and scan.end > 0
        if path is None:
            self.file: TextIO | None = sys.stdout
        else:
            if append:
                with open(path, "r+b") as f:
                    f.truncate(scan.end)  # cut a torn last record (and a JSON array's closing bracket)
            self.file = open(  # noqa: SIM115  the sink owns the file until close(): one record is written per call
                path, "a" if append else "w", encoding="utf-8", newline="", errors="surrogateescape"
            )
        self.count = scan.count if append and scan is not None else 0
        if not append:
            self.file.write({"json": "[\n", "csv": ",".join(CSV_FIELDS) + "\n"}.get(fmt, ""))
        self.file.flush()

    def write(self, rec: dict[str, Any]) -> None:
        assert self.file is not None, "write after close"
        if self.fmt == "csv":
            buf = io.StringIO()
            csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore", lineterminator="\n").writerow(_csv_row(rec))
            text = buf.getvalue()
        elif self.fmt == "json":
            text = (",\n" if self.count else "") + json.dumps(rec)
        else:
            text = json.dumps(rec) + "\n"
        self.file.write(text)
        self.file.flush()
        self.count += 1

    def close(self) -> None:
        if self.file is None:
            return
        if self.fmt == "json":
            self.file.write("\n]\n" if self.count else "]\n")
        self.file.flush()
        if self.file is not sys.stdout:
            self.file.close()
        self.file = None


# ---------------------------------------------------------------------------- torchrun part files
def part_path(output: str, rank: int, world: int) -> str:
    """The JSONL file rank ``rank`` of ``world`` writes its records to."""
    return f"{output}.part{rank}-of-{world}.jsonl"


def stale_parts(output: str) -> list[str]:
    """Part files of ``output`` left by any earlier torchrun job."""
    return sorted(glob.glob(glob.escape(output) + ".part*-of-*.jsonl"))


def read_part(path: str) -> Iterator[dict]:
    """The complete records of a part file (a torn last line and foreign lines are skipped)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if not line.endswith("\n"):
                return  # torn last line
            try:
                yield json.loads(line)
            except ValueError:
                continue


def recover_parts(output: str, writer: RecordWriter, scan: Scan, order: dict[str, int]) -> int:
    """Append records left in part files by a killed torchrun job (input order), then delete the parts."""
    parts = stale_parts(output)
    recs = {}
    for part in parts:
        for rec in read_part(part):
            k = path_key(rec.get("image", ""))
            if k not in scan.status and k not in recs:
                recs[k] = rec
    for k in sorted(recs, key=lambda k: order.get(k, len(order))):
        writer.write(recs[k])
        scan.status[k] = bool(recs[k].get("error"))
    for part in parts:
        os.remove(part)
    return len(recs)


def merge_parts(output: str, world: int, writer: RecordWriter) -> None:
    """Round-robin over the ranks' part files restores input order (rank r had items r, r+N, ...)."""
    parts = [part_path(output, r, world) for r in range(world)]
    readers = [read_part(p) for p in parts if os.path.exists(p)]
    while readers:
        for reader in list(readers):
            rec = next(reader, None)
            if rec is None:
                readers.remove(reader)
            else:
                writer.write(rec)
    for p in parts:
        if os.path.exists(p):
            os.remove(p)


# ---------------------------------------------------------------------------- attention files
def _safe(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:limit] or "x"


def attention_name(path: str) -> str:
    """A flat, safe, unique file stem for an input: ``<stem>-<hash of its absolute path>``."""
    digest = hashlib.sha1(os.path.abspath(path).encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"{_safe(Path(path).stem)}-{digest}"


def _write_atomic(target: Path, data: bytes, protected: set[str]) -> None:
    if os.path.realpath(target) in protected:
        raise OSError(f"refusing to overwrite input {target}")
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def write_attention(folder: Path, result: Result, protected: set[str]) -> str:
    """``<name>.npz`` (attention (T, H, W), tokens, logprobs) and ``<name>/NN-word.png`` overlays.

    ``protected`` holds the real paths of the inputs, which are never overwritten. Returns the npz path.
    """
    import numpy as np
    from PIL import Image

    from .overlay import overlay_png

    c = result.caption
    assert c is not None, "attention files of a failed input"
    name = attention_name(result.path)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        attention=c.attention.astype(np.float32),
        tokens=np.array(c.tokens, dtype=str),
        logprobs=np.array(c.logprobs, dtype=np.float32),
        image=np.array(result.path),
        caption=np.array(c.text),
    )
    pngs = folder / name
    pngs.mkdir(parents=True, exist_ok=True)
    for stale in pngs.glob("[0-9][0-9]-*.png"):  # from an earlier, longer caption of this image
        stale.unlink()
    if result.thumb is not None:
        img = Image.fromarray(result.thumb, "RGB")
        for t, (word, grid) in enumerate(zip(c.tokens, c.attention, strict=True)):  # grid (H, W)
            _write_atomic(pngs / f"{t:02d}-{_safe(word, 24)}.png", overlay_png(img, grid), protected)
    npz = folder / f"{name}.npz"
    _write_atomic(npz, buf.getvalue(), protected)
    return str(npz)
