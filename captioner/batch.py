"""``captioner caption``: caption thousands of images into JSONL, CSV or JSON.

Flow::

    inputs (files, folders, globs, stdin)  --expand-->  sorted, de-duplicated paths
      --DataLoader workers: cap.preprocess-->  batches (B, 3, S, S)
      --cap.encode / cap.decode (batched beam search)-->  one record per image, flushed at once

``--resume`` skips images that already have a record in ``--output`` (a torn last
line from a kill is cut off first). Under ``torchrun`` each rank captions every
WORLD_SIZE-th image into a part file and rank 0 merges the parts in input order.
See docs/cli.md.
"""
from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import io
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TextIO

import numpy as np

from .commands.common import int_range
from .images import DEFAULT_MAX_PIXELS, ImageError, is_image_path, load_image

FORMATS = ("jsonl", "csv", "json")
CSV_FIELDS = ["image", "caption", "score", "tokens", "alternatives", "attention", "error", "error_code", "concepts"]
THUMB_SIDE = 384  # overlays are drawn on images scaled to at most this many pixels
PROG = "captioner caption"


# ---------------------------------------------------------------------------- arguments
def default_workers() -> int:
    """Decoding processes: one core is left for the model (0 = decode in the main process)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .api import GUIDANCE, MAX_BEAM_SIZE, MAX_LENGTH_LIMIT

    c = sub.add_parser(
        "caption",
        help="caption image files, folders, globs or a list on stdin",
        description="Caption many images in batches; one record per image (see docs/cli.md).",
    )
    c.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders, glob patterns ('photos/**/*.jpg'), or - to read paths from stdin")
    c.add_argument("-r", "--recursive", action="store_true", help="also take images from sub-folders")
    c.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (default: $CAPTIONER_MODEL or the shipped model)")
    c.add_argument("-o", "--output", metavar="FILE", help="output file (default: stdout)")
    c.add_argument("--format", choices=FORMATS, help="record format (default: from the output's extension, else jsonl)")
    c.add_argument("--resume", action="store_true", help="skip images already in --output and append the rest")
    c.add_argument("--attention-dir", metavar="DIR", help="write per-word attention overlays (PNG) and grids (.npz) here")
    c.add_argument("--beam-size", metavar="K", type=int_range(1, MAX_BEAM_SIZE),
                   help=f"beam width, 1..{MAX_BEAM_SIZE} (default: the checkpoint's)")
    c.add_argument("--max-length", metavar="N", type=int_range(1, MAX_LENGTH_LIMIT),
                   help=f"maximum caption words, 1..{MAX_LENGTH_LIMIT} (default: the checkpoint's)")
    c.add_argument("--n-best", metavar="N", type=int_range(1, MAX_BEAM_SIZE), default=1,
                   help="also record the next N-1 best captions as 'alternatives' (default: 1)")
    c.add_argument("--length-alpha", metavar="A", type=float, help="length penalty exponent (default: the checkpoint's)")
    c.add_argument("--guidance", choices=GUIDANCE,
                   help="concepts: the caption names the most likely visual concept once, unless that costs "
                        "the model too much; none: the plain model (default: the checkpoint's, concepts)")
    c.add_argument("--batch-size", metavar="B", type=int_range(1), default=16,
                   help="images per encoder pass and beam search (default: 16)")
    c.add_argument("--workers", metavar="W", type=int_range(0), default=default_workers(),
                   help=f"image-decoding processes, 0 = none (default here: {default_workers()})")
    c.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    c.add_argument("--exact", action="store_true",
                   help="run the fp32 model exactly as trained, without the CPU speed-ups (int8 decoder, ...)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary (errors are still shown)")
    c.set_defaults(func=run, _parser=c)


def output_format(output: str | None, fmt: str | None) -> str:
    """--format if given, else the output's extension (.csv, .json), else jsonl."""
    if fmt:
        return fmt
    suffix = Path(output).suffix.lower().lstrip(".") if output else ""
    return suffix if suffix in ("csv", "json") else "jsonl"


# ---------------------------------------------------------------------------- inputs
def path_key(path: str) -> str:
    """The identity of an input in an output file (resume, de-duplication)."""
    return os.path.normpath(path)


def _folder_images(folder: str, recursive: bool) -> list[str]:
    """Image files in ``folder`` (sorted; hidden names skipped; symlinked folders not followed)."""
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        found += [os.path.join(root, f) for f in files if not f.startswith(".") and is_image_path(f)]
    return sorted(found)


def expand(inputs: list[str], recursive: bool = False, stdin: TextIO | None = None) -> list[str]:
    """Files, folders, glob patterns and ``-`` (one path per stdin line) -> image paths in input order.

    Folders and globs contribute only image files, sorted; a file named
    explicitly is always taken (and fails later if it is not an image); a
    missing path or a glob matching nothing is kept so it gets an error record.
    Duplicates keep their first position.
    """
    paths: list[str] = []
    for item in inputs:
        if item == "-":
            lines = [line.strip() for line in (stdin or sys.stdin)]
            for line in filter(None, lines):
                paths += _folder_images(line, recursive) if os.path.isdir(line) else [line]
        elif os.path.isdir(item):
            paths += _folder_images(item, recursive)
        elif not os.path.lexists(item) and glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            for m in matches:
                paths += _folder_images(m, recursive) if os.path.isdir(m) else [m] if is_image_path(m) else []
            if not matches:
                paths.append(item)
        else:
            paths.append(item)
    seen: set[str] = set()
    unique = []
    for p in paths:
        if path_key(p) not in seen:
            seen.add(path_key(p))
            unique.append(p)
    return unique


# ---------------------------------------------------------------------------- output files
@dataclass
class Scan:
    """What an existing output file holds: complete records and where the last one ends."""

    status: dict[str, bool] = field(default_factory=dict)  # path key -> failed?
    count: int = 0
    end: int = 0  # byte offset just after the last complete record (a torn tail lies beyond)


def scan_output(path: str, fmt: str) -> Scan:
    """Read an output written by this tool (possibly killed mid-record), streaming, without changing it."""
    scan = Scan()
    if not os.path.exists(path):
        return scan

    def add(rec: Any, end: int) -> None:
        if isinstance(rec, dict) and isinstance(rec.get("image"), str):
            scan.status[path_key(rec["image"])] = bool(rec.get("error"))
            scan.count += 1
            scan.end = end

    with open(path, "rb") as f:
        if fmt == "csv":
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
                    return scan
                scan.end = pos  # the header counts even without rows
                for row in rows:
                    if exhausted:
                        break
                    add(dict(zip(header, row)), pos)
            except csv.Error:
                pass  # a malformed tail: keep what was complete before it
            return scan
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
            add(rec, start + len(body) if fmt == "json" else pos)
    return scan


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
            self.file = open(path, "a" if append else "w", encoding="utf-8", newline="", errors="surrogateescape")
        self.count = scan.count if append else 0
        if not append:
            self.file.write({"json": "[\n", "csv": ",".join(CSV_FIELDS) + "\n"}.get(fmt, ""))
        self.file.flush()

    def write(self, rec: dict[str, Any]) -> None:
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


# ---------------------------------------------------------------------------- decoding images (worker processes)
@dataclass
class Batch:
    """A collated batch: decoded images stacked, failures kept per position."""

    paths: list[str]
    images: Any  # torch.Tensor (b, 3, S, S) of the images that decoded, in order; None if none did
    ok: list[int]  # positions in ``paths`` of the rows of ``images``
    errors: dict[int, tuple[str, str]]  # position -> (message, code)
    thumbs: dict[int, np.ndarray]  # position -> (h, w, 3) uint8, only with --attention-dir

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True) for CUDA
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


class ImageFiles:
    """Map-style dataset of image paths -> (path, tensor (3, S, S) | None, thumbnail | None, error | None).

    It runs ``Captioner.preprocess`` itself (the one preprocessing path) on a stand-in that
    carries only the encoder config, so worker processes never receive the model.
    """

    def __init__(self, cap: Any, paths: list[str], thumbs: bool) -> None:
        self.preprocess = type(cap).preprocess
        self.stand_in = SimpleNamespace(encoder_cfg=cap.encoder_cfg)
        self.paths, self.thumbs = paths, thumbs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, Any, np.ndarray | None, tuple[str, str] | None]:
        path = self.paths[i]
        try:
            tensor, _ = self.preprocess(self.stand_in, path)  # == cap.preprocess(path)
            thumb = None
            if self.thumbs:
                img = load_image(path, max_pixels=DEFAULT_MAX_PIXELS, draft_size=THUMB_SIDE)
                img.thumbnail((THUMB_SIDE, THUMB_SIDE))
                thumb = np.asarray(img, dtype=np.uint8)  # (h, w, 3)
            return path, tensor, thumb, None
        except ImageError as exc:
            return path, None, None, (str(exc), exc.code)
        except Exception as exc:  # noqa: BLE001 - one bad input must never stop the run
            return path, None, None, (f"{type(exc).__name__}: {exc}", "error")


def collate(items: list[tuple]) -> Batch:
    import torch

    good = [k for k, it in enumerate(items) if it[3] is None]
    return Batch(
        paths=[it[0] for it in items],
        images=torch.stack([items[k][1] for k in good]) if good else None,  # (b, 3, S, S)
        ok=good,
        errors={k: it[3] for k, it in enumerate(items) if it[3] is not None},
        thumbs={k: it[2] for k, it in enumerate(items) if it[2] is not None},
    )


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)


# ---------------------------------------------------------------------------- captioning
@dataclass
class Result:
    path: str
    caption: Any = None  # api.Caption
    thumb: np.ndarray | None = None
    error: str | None = None
    code: str | None = None


def iter_captions(
    cap: Any,
    paths: list[str],
    batch_size: int = 16,
    workers: int = 0,
    beam_size: int | None = None,
    max_length: int | None = None,
    n_best: int = 1,
    length_alpha: float | None = None,
    thumbs: bool = False,
    guidance: str | None = None,
) -> Iterator[Result]:
    """Caption ``paths`` in order: decoding in ``workers`` processes overlaps batched encode + beam search."""
    import torch
    from torch.utils.data import DataLoader

    if not paths:
        return
    loader = DataLoader(
        ImageFiles(cap, paths, thumbs), batch_size=batch_size, num_workers=workers, collate_fn=collate,
        worker_init_fn=_worker_init if workers else None, pin_memory=cap.device.type == "cuda",
        prefetch_factor=2 if workers else None,
    )

    def run_model(images: torch.Tensor) -> list:
        annotations, concepts = cap.see(images)  # (b, L, D), b concept lists
        return cap.decode(annotations, beam_size, max_length, n_best, length_alpha, concepts, guidance)

    for batch in loader:
        captions: dict[int, Any] = {}
        if batch.images is not None:
            try:
                captions = dict(zip(batch.ok, run_model(batch.images)))
            except (RuntimeError, MemoryError):  # e.g. out of GPU memory: retry one image at a time
                for row, k in enumerate(batch.ok):
                    try:
                        captions[k] = run_model(batch.images[row : row + 1])[0]
                    except (RuntimeError, MemoryError) as exc:
                        batch.errors[k] = (f"captioning failed: {exc}", "model_error")
        for k, path in enumerate(batch.paths):
            if k in captions:
                yield Result(path, captions[k], batch.thumbs.get(k))
            else:
                msg, code = batch.errors[k]
                yield Result(path, error=msg, code=code)


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
    """``<name>.npz`` (attention (T, H, W), tokens, logprobs) and ``<name>/NN-word.png`` overlays."""
    from PIL import Image

    from .overlay import overlay_png

    c = result.caption
    name = attention_name(result.path)
    buf = io.BytesIO()
    np.savez_compressed(buf, attention=c.attention.astype(np.float32), tokens=np.array(c.tokens, dtype=str),
                        logprobs=np.array(c.logprobs, dtype=np.float32), image=np.array(result.path), caption=np.array(c.text))
    pngs = folder / name
    pngs.mkdir(parents=True, exist_ok=True)
    for stale in pngs.glob("[0-9][0-9]-*.png"):  # from an earlier, longer caption of this image
        stale.unlink()
    if result.thumb is not None:
        img = Image.fromarray(result.thumb, "RGB")
        for t, (word, grid) in enumerate(zip(c.tokens, c.attention)):  # grid (H, W)
            _write_atomic(pngs / f"{t:02d}-{_safe(word, 24)}.png", overlay_png(img, grid), protected)
    npz = folder / f"{name}.npz"
    _write_atomic(npz, buf.getvalue(), protected)
    return str(npz)


def make_record(result: Result, attention: str | None = None) -> dict[str, Any]:
    if result.error is not None:
        return {"image": result.path, "error": result.error, "error_code": result.code}
    rec = {"image": result.path} | result.caption.to_dict(attention=False)
    if attention:
        rec["attention"] = attention
    return rec


# ---------------------------------------------------------------------------- distributed (torchrun)
class Dist:
    """Rank/world from torchrun's environment; a gloo group for the two sync points (lazy, CPU only)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=timedelta(hours=24))
                self.owned = True

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: list[int]) -> list[int]:
        """Element-wise sum over ranks; also the barrier before rank 0 merges the parts."""
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.long)
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def part_path(output: str, rank: int, world: int) -> str:
    return f"{output}.part{rank}-of-{world}.jsonl"


def _stale_parts(output: str) -> list[str]:
    return sorted(glob.glob(glob.escape(output) + ".part*-of-*.jsonl"))


def _read_jsonl(path: str) -> Iterator[dict]:
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
    parts = _stale_parts(output)
    recs = {}
    for part in parts:
        for rec in _read_jsonl(part):
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
    readers = [_read_jsonl(p) for p in parts if os.path.exists(p)]
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


# ---------------------------------------------------------------------------- the command
def _usage(args: argparse.Namespace, message: str) -> None:
    args._parser.error(message)  # exits with status 2


def _resolve_device(args: argparse.Namespace, dist: Dist) -> str:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            _usage(args, f"--device {device}: CUDA is not available on this machine")
        if device == "cuda" and dist.world > 1:
            device = f"cuda:{dist.local_rank}"
    elif device != "cpu":
        _usage(args, f"--device must be cpu, cuda or cuda:N, not {device!r}")
    return device


class _Terminate(KeyboardInterrupt):
    """SIGTERM, turned into an exception so open files are closed properly (JSON gets its ']')."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminate()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``captioner caption``; returns the exit status (0 ok, 1 some input failed)."""
    fmt = output_format(args.output, args.format)
    if args.resume and not args.output:
        _usage(args, "--resume needs --output")
    if args.output and os.path.isdir(args.output):
        _usage(args, f"--output {args.output} is a folder")
    if args.inputs.count("-") > 1:
        _usage(args, "'-' (read paths from stdin) may be given only once")
    dist = Dist()
    if dist.world > 1 and not args.output:
        _usage(args, "under torchrun, --output is required (the ranks' parts are merged into it)")
    old = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        return _run(args, fmt, dist)
    except BrokenPipeError:  # stdout closed early, e.g. piped into head
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        dist.close()


def _run(args: argparse.Namespace, fmt: str, dist: Dist) -> int:
    from tqdm import tqdm

    from .api import Captioner
    from .checkpoint import CheckpointError

    try:
        cap = Captioner.load(args.checkpoint, device=_resolve_device(args, dist), fast=False if args.exact else None)
    except CheckpointError as exc:
        if args.checkpoint:
            raise
        raise CheckpointError(f"{exc}; pass --checkpoint FOLDER or set CAPTIONER_MODEL") from exc
    writer = None
    plan: dict[str, Any] = {}
    if dist.rank == 0:  # rank 0 alone reads inputs/stdin and the existing output, then tells the others
        try:
            paths = expand(args.inputs, args.recursive)
            if args.output and os.path.realpath(args.output) in {os.path.realpath(p) for p in paths}:
                raise ValueError(f"--output {args.output} is also an input")
            scan = scan_output(args.output, fmt) if args.resume else None
            if args.output and not args.resume:
                for part in _stale_parts(args.output):
                    os.remove(part)
            writer = RecordWriter(args.output, fmt, scan)
            if args.resume:
                recover_parts(args.output, writer, scan, {path_key(p): i for i, p in enumerate(paths)})
            if dist.world > 1:  # rank 0 reopens the output to merge the parts at the end
                writer.close()
            status = scan.status if scan else {}
            todo = [p for p in paths if path_key(p) not in status]
            plan = {"todo": todo, "skipped": len(paths) - len(todo),
                    "failed_before": sum(status.get(path_key(p), False) for p in paths)}
        except (ValueError, OSError) as exc:
            plan = {"error": str(exc)}
    plan = dist.broadcast(plan)
    if "error" in plan:
        if writer:
            writer.close()
        print(f"{PROG}: error: {plan['error']}", file=sys.stderr)
        return 2

    mine = plan["todo"][dist.rank :: dist.world]
    sink = writer if dist.world == 1 else RecordWriter(part_path(args.output, dist.rank, dist.world), "jsonl")
    att_dir = Path(args.attention_dir) if args.attention_dir else None
    if att_dir:
        att_dir.mkdir(parents=True, exist_ok=True)
    protected = {os.path.realpath(p) for p in mine} if att_dir else set()
    done = failed = 0
    bar = tqdm(total=len(mine), unit="img", file=sys.stderr,
               disable=args.quiet or dist.rank != 0 or not mine, mininterval=1.0, dynamic_ncols=True,
               desc=f"rank 0/{dist.world}" if dist.world > 1 else "captioning")
    start = time.perf_counter()
    try:
        for res in iter_captions(cap, mine, args.batch_size, args.workers, args.beam_size, args.max_length,
                                 args.n_best, args.length_alpha, thumbs=att_dir is not None, guidance=args.guidance):
            att = None
            if res.error is None and att_dir is not None:
                try:
                    att = write_attention(att_dir, res, protected)
                except OSError as exc:
                    res = Result(res.path, error=f"cannot write attention files: {exc}", code="write_error")
            if res.error is not None:
                failed += 1
                tqdm.write(f"{PROG}: {res.path}: {res.error}", file=sys.stderr)
            else:
                done += 1
            sink.write(make_record(res, att))
            bar.update(1)
            bar.set_postfix(failed=failed, refresh=False)
    finally:
        bar.close()
        sink.close()
    elapsed = time.perf_counter() - start
    done, failed = dist.sum([done, failed])  # every part is complete after this
    if dist.world > 1 and dist.rank == 0:
        writer = RecordWriter(args.output, fmt, scan_output(args.output, fmt))
        try:
            merge_parts(args.output, dist.world, writer)
        finally:
            writer.close()
    if dist.rank == 0 and not args.quiet:
        rate = (done + failed) / elapsed if elapsed > 0 else 0.0
        before = f" ({plan['failed_before']} in an earlier run)" if plan["failed_before"] else ""
        print(f"{PROG}: {done} captioned, {plan['skipped']} skipped, {failed + plan['failed_before']} failed{before}"
              f" in {elapsed:.1f} s ({rate:.2f} images/s, encoder: {cap.runtime})"
              + (f" -> {args.output}" if args.output else ""),
              file=sys.stderr)
    return 1 if failed or plan["failed_before"] else 0
